package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// Logger writes the subscriber's log lines (not the display lines).
type Logger interface {
	// Infof logs a normal event.
	Infof(format string, args ...any)
	// Errorf logs a failure the subscriber goes on after.
	Errorf(format string, args ...any)
	// Fatalf logs the failure that ends the process, like log.Fatalf, but leaves
	// exiting to the caller so deferred cleanup (and tests) still run.
	Fatalf(format string, args ...any)
}

// NewLogger returns the text logger (format "text") or the JSON logger ("json"),
// both writing to w.
func NewLogger(format string, w io.Writer) Logger {
	if format == "json" {
		return NewJSONLogger(w)
	}
	return NewTextLogger(log.New(w, "", log.LstdFlags))
}

// TextLogger writes the original's lines: the std log prefix, then
// "[<RFC 3339 time>] " and the text.
type TextLogger struct {
	l *log.Logger
}

// NewTextLogger wraps a std logger (main passes one with the default flags).
func NewTextLogger(l *log.Logger) *TextLogger { return &TextLogger{l: l} }

// Infof implements Logger.
func (t *TextLogger) Infof(format string, args ...any) {
	t.l.Printf("[%s] %s", time.Now().Format(time.RFC3339), fmt.Sprintf(format, args...))
}

// Errorf implements Logger; text lines carry no level, as in the original.
func (t *TextLogger) Errorf(format string, args ...any) { t.Infof(format, args...) }

// Fatalf implements Logger. The original called log.Fatalf directly, so this line
// has the std log prefix but no "[time]" part.
func (t *TextLogger) Fatalf(format string, args ...any) { t.l.Printf(format, args...) }

// JSONLogger writes one JSON object per line (LOG_FORMAT=json), with the same keys
// as the Python processes: time (UTC), level, logger, msg.
type JSONLogger struct {
	l *slog.Logger
}

// NewJSONLogger returns a JSONLogger writing to w.
func NewJSONLogger(w io.Writer) *JSONLogger {
	h := slog.NewJSONHandler(w, &slog.HandlerOptions{
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey && a.Value.Kind() == slog.KindTime {
				a.Value = slog.TimeValue(a.Value.Time().UTC())
			}
			return a
		},
	})
	return &JSONLogger{l: slog.New(h).With("logger", "go-subscriber")}
}

// Infof implements Logger.
func (j *JSONLogger) Infof(format string, args ...any) {
	j.l.Info(fmt.Sprintf(format, args...))
}

// Errorf implements Logger.
func (j *JSONLogger) Errorf(format string, args ...any) {
	j.l.Error(fmt.Sprintf(format, args...))
}

// Fatalf implements Logger.
func (j *JSONLogger) Fatalf(format string, args ...any) {
	j.l.Error(fmt.Sprintf(format, args...))
}

// redisLogger routes go-redis's internal messages (e.g. a failed redial while Redis
// restarts) to the subscriber's logger, so they reach stdout in the same format
// instead of stderr. While Redis is down go-redis retries many times a second; a
// message equal to the previous one is dropped for redisLogRepeat.
type redisLogger struct {
	l      Logger
	prefix string // "redis: ", or "OpenTelemetry: " for the span exporter's errors

	mu   sync.Mutex
	last string
	at   time.Time
}

// redisLogRepeat is how long an identical go-redis message stays silenced.
const redisLogRepeat = 10 * time.Second

func newRedisLogger(l Logger) *redisLogger { return &redisLogger{l: l, prefix: "redis: "} }

// newOTelLogger is the same de-duplicating logger for OpenTelemetry's errors (a
// collector that is down fails every batch export, every 5 s).
func newOTelLogger(l Logger) *redisLogger { return &redisLogger{l: l, prefix: "OpenTelemetry: "} }

// Printf implements go-redis's internal.Logging.
func (r *redisLogger) Printf(_ context.Context, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if !strings.HasPrefix(msg, r.prefix) {
		msg = r.prefix + msg
	}
	r.mu.Lock()
	now := time.Now()
	repeat := msg == r.last && now.Sub(r.at) < redisLogRepeat
	if !repeat {
		r.last, r.at = msg, now
	}
	r.mu.Unlock()
	if !repeat {
		r.l.Errorf("%s", msg)
	}
}
