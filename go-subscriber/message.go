package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// Sources named at the end of a display line.
const (
	// SourcePubSub marks a message received on a pub/sub channel.
	SourcePubSub = "pub-sub"
	// SourceQueue marks a message popped from a list.
	SourceQueue = "queue"
)

// displayTimeLayout is how the display line shows a time (the original's).
const displayTimeLayout = "2006-01-02 15:04:05"

// zonelessLayout is the original Python publisher's datetime.now().isoformat():
// local time without an offset, with optional fractional seconds.
const zonelessLayout = "2006-01-02T15:04:05.999999999"

// maxFieldBytes caps each displayed field, so a hostile multi-megabyte string does
// not flood the terminal or the log collector. Envelopes in the contract are far shorter.
const maxFieldBytes = 4096

// Message is the envelope of contracts/envelope.schema.json: the original Hello
// message plus the optional domain-event fields Type, Version, Data and Traceparent.
type Message struct {
	// ID is the event id (a UUID).
	ID string `json:"id"`
	// Timestamp is when the event happened, RFC 3339 (or the original's zone-less form).
	Timestamp string `json:"timestamp"`
	// Message is the human line that is displayed.
	Message string `json:"message"`
	// Sender is the process that emitted the message.
	Sender string `json:"sender"`
	// Count is the Hello message number, or the order number of an order event.
	Count int `json:"count"`
	// Type is the domain event type (e.g. "OrderPlaced"); empty on Hello messages.
	Type string `json:"type,omitempty"`
	// Version is the version of Data's shape; zero on Hello messages.
	Version int `json:"version,omitempty"`
	// Data is the domain event's payload, kept raw until Summary reads it by Type.
	Data json.RawMessage `json:"data,omitempty"`
	// Traceparent is the W3C trace context of the event ("00-<trace id>-<span id>-<flags>").
	Traceparent string `json:"traceparent,omitempty"`
	// Tracestate is the W3C vendor trace state that travels with Traceparent.
	Tracestate string `json:"tracestate,omitempty"`
}

// traceparentCarrier hands an envelope's traceparent alone to OpenTelemetry's W3C
// propagator (the common case: one small allocation, no map per message).
type traceparentCarrier string

func (c traceparentCarrier) Get(key string) string {
	if key == "traceparent" {
		return string(c)
	}
	return ""
}

func (traceparentCarrier) Set(string, string) {}

func (traceparentCarrier) Keys() []string { return []string{"traceparent"} }

// traceCarrier hands an envelope's traceparent and tracestate to the propagator.
type traceCarrier struct{ traceparent, tracestate string }

func (c traceCarrier) Get(key string) string {
	switch key {
	case "traceparent":
		return c.traceparent
	case "tracestate":
		return c.tracestate
	}
	return ""
}

func (traceCarrier) Set(string, string) {}

func (traceCarrier) Keys() []string { return []string{"traceparent", "tracestate"} }

// RemoteSpanContext is the span context of msg's traceparent, parsed by
// OpenTelemetry's W3C propagator (exact lengths, lower-case hex, no trailing bytes,
// all-zero ids refused), with its tracestate when that is valid too; it is invalid
// when msg has no usable traceparent.
func (msg Message) RemoteSpanContext() trace.SpanContext {
	if msg.Traceparent == "" {
		return trace.SpanContext{}
	}
	var carrier propagation.TextMapCarrier = traceparentCarrier(msg.Traceparent)
	if msg.Tracestate != "" {
		carrier = traceCarrier{msg.Traceparent, msg.Tracestate}
	}
	ctx := propagation.TraceContext{}.Extract(context.Background(), carrier)
	return trace.SpanContextFromContext(ctx)
}

// errNotObject is returned for JSON that is valid but not an object (e.g. null or 42).
var errNotObject = errors.New("message is not a JSON object")

// ParseMessage decodes one envelope. Missing fields stay empty, as in the original;
// invalid JSON and wrong types (e.g. "count": "x") are errors.
func ParseMessage(payload []byte) (Message, error) {
	var msg Message
	trimmed := bytes.TrimSpace(payload)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		if json.Valid(trimmed) {
			return Message{}, errNotObject
		}
	}
	if err := json.Unmarshal(trimmed, &msg); err != nil {
		return Message{}, err
	}
	return msg, nil
}

// EventTime is the time a message shows: its own timestamp when it parses, else
// receivedAt. The bool reports whether the message's own timestamp was used.
//
// Zoned RFC 3339 times (the contract: "2026-11-28T10:15:02.123456+00:00" or "...Z")
// are converted to UTC, the zone every publisher of this project writes in, so one
// stream never mixes zones. The original Python publisher's zone-less form
// ("2025-03-29T08:32:00.123456") was the sender's local time; it is read in the
// subscriber's local zone (they ran on the same machine in the tutorial) and shown
// with the same wall-clock digits it was sent with, never shifted.
func EventTime(timestamp string, receivedAt time.Time) (time.Time, bool) {
	if timestamp == "" {
		return receivedAt.UTC(), false
	}
	if t, err := time.Parse(time.RFC3339Nano, timestamp); err == nil {
		return t.UTC(), true
	}
	if t, err := time.ParseInLocation(zonelessLayout, timestamp, time.Local); err == nil {
		return t, true
	}
	return receivedAt.UTC(), false
}

// DisplayLine is the line printed for one received message, newline included:
//
//	[2006-01-02 15:04:05] [sender] summary (ID: id) [Received #n from source]
//	[2006-01-02 15:04:05] [sender] summary (ID: id, trace: trace-id) [Received #n from source]
//
// The summary is msg.Summary(): the message as sent for Hello messages, a line
// rendered from the data for each known event type. The trace part appears when the
// message carries a valid traceparent. Fields are shown as sent, except that control
// characters (newlines, ANSI escapes) are escaped, so one message is always one line,
// and overlong fields are cut.
func DisplayLine(msg Message, received int, source string, receivedAt time.Time) string {
	summary, _ := msg.Summary()
	return displayLine(msg, summary, msg.RemoteSpanContext(), received, source, receivedAt)
}

// displayLine is DisplayLine with the summary and span context already worked out.
func displayLine(msg Message, summary string, sc trace.SpanContext, received int, source string, receivedAt time.Time) string {
	t, _ := EventTime(msg.Timestamp, receivedAt)
	id := clean(msg.ID)
	if sc.IsValid() {
		id += ", trace: " + sc.TraceID().String()
	}
	return fmt.Sprintf("[%s] [%s] %s (ID: %s) [Received #%d from %s]\n",
		t.Format(displayTimeLayout), clean(msg.Sender), clean(summary), id, received, source)
}

// clean escapes control characters, replaces bytes that are not UTF-8 with U+FFFD (a
// terminal or a JSON log collector must never see raw invalid bytes) and truncates s
// to maxFieldBytes (on a rune boundary).
func clean(s string) string {
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
	}
	truncated := false
	if len(s) > maxFieldBytes {
		cut := maxFieldBytes
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s, truncated = s[:cut], true
	}
	if strings.IndexFunc(s, unicode.IsControl) >= 0 {
		var b strings.Builder
		for _, r := range s {
			if unicode.IsControl(r) {
				q := strconv.QuoteRune(r) // '\n' or '\x1b', quotes included
				b.WriteString(q[1 : len(q)-1])
				continue
			}
			b.WriteRune(r)
		}
		s = b.String()
	}
	if truncated {
		s += "…"
	}
	return s
}
