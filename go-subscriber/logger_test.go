package main

import (
	"context"
	"encoding/json"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// The original's line: the std log prefix, then "[RFC 3339] ", then the text.
var textLine = regexp.MustCompile(`\A\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} \[\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(Z|[+-]\d{2}:\d{2})\] (.*)\z`)

func TestTextLogger(t *testing.T) {
	buf := &syncBuffer{}
	l := NewLogger("text", buf)
	l.Infof("Pattern: %s", "both")
	l.Errorf("Error in BLPOP: %v", "boom")
	l.Fatalf("Subscriber failed: %v", "failed to connect after 5 attempts")
	lines := buf.lines()
	if len(lines) != 3 {
		t.Fatalf("lines = %q", lines)
	}
	for i, want := range []string{"Pattern: both", "Error in BLPOP: boom"} {
		m := textLine.FindStringSubmatch(lines[i])
		if m == nil || m[2] != want {
			t.Errorf("line %d = %q, want the original format with %q", i, lines[i], want)
		}
		if _, err := time.Parse(time.RFC3339, lines[i][21:strings.Index(lines[i], "]")]); err != nil {
			t.Errorf("line %d: %v", i, err)
		}
	}
	// The original's log.Fatalf: std prefix, no "[time]".
	if !regexp.MustCompile(`\A\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} Subscriber failed: failed to connect after 5 attempts\z`).MatchString(lines[2]) {
		t.Errorf("fatal line = %q", lines[2])
	}
}

func TestJSONLogger(t *testing.T) {
	buf := &syncBuffer{}
	l := NewLogger("json", buf)
	l.Infof("Connected to Redis at %s", "localhost:6379")
	l.Errorf("Failed to parse message from %s: %v", "queue", "bad")
	want := []struct{ level, msg string }{
		{"INFO", "Connected to Redis at localhost:6379"},
		{"ERROR", "Failed to parse message from queue: bad"},
	}
	lines := buf.lines()
	if len(lines) != len(want) {
		t.Fatalf("lines = %q", lines)
	}
	for i, line := range lines {
		var entry map[string]string
		if err := json.Unmarshal([]byte(line), &entry); err != nil {
			t.Fatalf("line %d %q: %v", i, line, err)
		}
		if entry["level"] != want[i].level || entry["msg"] != want[i].msg || entry["logger"] != "go-subscriber" {
			t.Errorf("line %d = %v", i, entry)
		}
		if ts, err := time.Parse(time.RFC3339Nano, entry["time"]); err != nil || !strings.HasSuffix(entry["time"], "Z") || time.Since(ts) > time.Minute {
			t.Errorf("line %d time = %q (%v), want UTC now", i, entry["time"], err)
		}
	}
}

func TestRedisLoggerDropsRepeats(t *testing.T) {
	buf := &syncBuffer{}
	r := newRedisLogger(NewLogger("text", buf))
	ctx := context.Background()
	for range 20 {
		r.Printf(ctx, "redis: connection pool: failed to dial after %d attempts: %s", 1, "refused")
	}
	r.Printf(ctx, "pubsub: %s", "reconnecting")
	r.Printf(ctx, "redis: connection pool: failed to dial after %d attempts: %s", 1, "refused")
	want := []string{
		"redis: connection pool: failed to dial after 1 attempts: refused",
		"redis: pubsub: reconnecting",
		"redis: connection pool: failed to dial after 1 attempts: refused",
	}
	if got := logTexts(buf); !slices.Equal(got, want) {
		t.Errorf("got %q\nwant %q", got, want)
	}
}

// The line pattern is a full match: \A...\z, so a line with a trailing newline (two
// lines glued together) does not pass for one.
func TestTextLinePatternIsAFullMatch(t *testing.T) {
	line := "2026/11/28 10:15:00 [2026-11-28T10:15:00Z] Starting Go Subscriber..."
	if !textLine.MatchString(line) {
		t.Fatalf("%q does not match", line)
	}
	for _, bad := range []string{line + "\n", line + "\nsecond line", "x" + line} {
		if textLine.MatchString(bad) {
			t.Errorf("%q matches", bad)
		}
	}
}
