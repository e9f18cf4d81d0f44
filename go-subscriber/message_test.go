package main

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"
)

// receivedAt is the receipt time the tests pass; shown only when the message's own
// timestamp is missing or unparseable. Its zone is not UTC on purpose.
var receivedAt = time.Date(2026, 11, 28, 11, 0, 0, 0, time.FixedZone("CET", 3600))

func TestDisplayLine(t *testing.T) {
	tests := []struct {
		name    string
		payload string
		want    string
	}{
		{
			"contract form, microseconds and +00:00",
			`{"id":"a","timestamp":"2026-11-28T10:15:02.123456+00:00","message":"Hello from Python #7","sender":"python-publisher","count":7}`,
			"[2026-11-28 10:15:02] [python-publisher] Hello from Python #7 (ID: a) [Received #3 from queue]\n",
		},
		{
			"Z and no fraction",
			`{"id":"a","timestamp":"2026-11-28T10:15:02Z","message":"m","sender":"s","count":1}`,
			"[2026-11-28 10:15:02] [s] m (ID: a) [Received #3 from queue]\n",
		},
		{
			"other offsets are shown in UTC",
			`{"id":"a","timestamp":"2026-11-28T12:15:02.5+02:00","message":"m","sender":"s","count":1}`,
			"[2026-11-28 10:15:02] [s] m (ID: a) [Received #3 from queue]\n",
		},
		{
			"original Python zone-less form shown as sent",
			`{"id":"a","timestamp":"2025-03-29T08:32:00.123456","message":"m","sender":"s","count":1}`,
			"[2025-03-29 08:32:00] [s] m (ID: a) [Received #3 from queue]\n",
		},
		{
			"zone-less without fraction",
			`{"id":"a","timestamp":"2025-03-29T08:32:00","message":"m","sender":"s","count":1}`,
			"[2025-03-29 08:32:00] [s] m (ID: a) [Received #3 from queue]\n",
		},
		{
			"missing timestamp: receipt time in UTC",
			`{"id":"a","message":"m","sender":"s","count":1}`,
			"[2026-11-28 10:00:00] [s] m (ID: a) [Received #3 from queue]\n",
		},
		{
			"garbage timestamp: receipt time",
			`{"id":"a","timestamp":"yesterday","message":"m","sender":"s","count":1}`,
			"[2026-11-28 10:00:00] [s] m (ID: a) [Received #3 from queue]\n",
		},
		{
			"impossible date: receipt time",
			`{"id":"a","timestamp":"2026-13-45T99:00:00Z","message":"m","sender":"s","count":1}`,
			"[2026-11-28 10:00:00] [s] m (ID: a) [Received #3 from queue]\n",
		},
		{
			"missing fields stay empty, as in the original",
			`{}`,
			"[2026-11-28 10:00:00] []  (ID: ) [Received #3 from queue]\n",
		},
		{
			"unknown fields ignored, order fields kept out of the line",
			`{"id":"a","timestamp":"2026-11-28T10:15:04Z","message":"m","sender":"s","count":42,"type":"OrderPlaced","version":1,"data":{"order_id":42},"extra":[1,2]}`,
			"[2026-11-28 10:15:04] [s] m (ID: a) [Received #3 from queue]\n",
		},
		{
			"control characters escaped: one message, one line",
			`{"id":"a\u001b[2J","timestamp":"2026-11-28T10:15:04Z","message":"line1\nline2\r\tend","sender":"s","count":1}`,
			"[2026-11-28 10:15:04] [s] line1\\nline2\\r\\tend (ID: a\\x1b[2J) [Received #3 from queue]\n",
		},
		{
			"unicode kept",
			`{"id":"a","timestamp":"2026-11-28T10:15:04Z","message":"Bestellung für Zoë ✓","sender":"s","count":1}`,
			"[2026-11-28 10:15:04] [s] Bestellung für Zoë ✓ (ID: a) [Received #3 from queue]\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			msg, err := ParseMessage([]byte(tt.payload))
			if err != nil {
				t.Fatalf("ParseMessage: %v", err)
			}
			if got := DisplayLine(msg, 3, SourceQueue, receivedAt); got != tt.want {
				t.Errorf("DisplayLine\n got %q\nwant %q", got, tt.want)
			}
		})
	}
}

func TestEventTime(t *testing.T) {
	tests := []struct {
		timestamp string
		want      time.Time
		own       bool
	}{
		{"2026-11-28T10:15:02.123456+00:00", time.Date(2026, 11, 28, 10, 15, 2, 123456000, time.UTC), true},
		{"2026-11-28T10:15:02Z", time.Date(2026, 11, 28, 10, 15, 2, 0, time.UTC), true},
		{"2026-11-28T05:15:02-05:00", time.Date(2026, 11, 28, 10, 15, 2, 0, time.UTC), true},
		{"2025-03-29T08:32:00.123456", time.Date(2025, 3, 29, 8, 32, 0, 123456000, time.Local), true},
		{"", receivedAt.UTC(), false},
		{"not a time", receivedAt.UTC(), false},
		{"2026-11-28 10:15:02", receivedAt.UTC(), false},
	}
	for _, tt := range tests {
		t.Run(tt.timestamp, func(t *testing.T) {
			got, own := EventTime(tt.timestamp, receivedAt)
			if !got.Equal(tt.want) || own != tt.own || got.Location() != tt.want.Location() {
				t.Errorf("EventTime(%q) = %s, %v; want %s, %v", tt.timestamp, got, own, tt.want, tt.own)
			}
		})
	}
}

func TestParseMessageRejects(t *testing.T) {
	tests := []struct {
		name    string
		payload string
		want    string // substring of the error
	}{
		{"not JSON", `Hello`, "invalid character 'H'"},
		{"truncated JSON", `{"id":"a",`, "unexpected end of JSON input"},
		{"empty", ``, "unexpected end of JSON input"},
		{"count is a string", `{"id":"a","count":"x"}`, "cannot unmarshal string into Go struct field Message.count of type int"},
		{"count is a float", `{"count":1.5}`, "cannot unmarshal number 1.5"},
		{"count overflows", `{"count":1e30}`, "cannot unmarshal number 1e30"},
		{"id is a number", `{"id":5}`, "Message.id of type string"},
		{"timestamp is a number", `{"timestamp":1732788902}`, "Message.timestamp of type string"},
		{"version is a string", `{"type":"OrderPlaced","version":"1"}`, "Message.version of type int"},
		{"null", `null`, errNotObject.Error()},
		{"array", `[1,2]`, errNotObject.Error()},
		{"string", `"hello"`, errNotObject.Error()},
		{"trailing garbage", `{"id":"a"} x`, "invalid character 'x' after top-level value"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseMessage([]byte(tt.payload))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ParseMessage(%q) error = %v, want it to contain %q", tt.payload, err, tt.want)
			}
		})
	}
	if _, err := ParseMessage([]byte("null")); !errors.Is(err, errNotObject) {
		t.Errorf("ParseMessage(null) = %v, want errNotObject", err)
	}
}

func TestHugeFieldsAreCut(t *testing.T) {
	huge := strings.Repeat("é", 1<<18) // 512 KiB of 2-byte runes
	payload := fmt.Sprintf(`{"id":"a","timestamp":"2026-11-28T10:15:04Z","message":%q,"sender":%q,"count":1}`, huge, huge)
	msg, err := ParseMessage([]byte(payload))
	if err != nil {
		t.Fatal(err)
	}
	line := DisplayLine(msg, 1, SourcePubSub, receivedAt)
	if !utf8.ValidString(line) {
		t.Error("line is not valid UTF-8 after cutting")
	}
	if len(line) > 3*maxFieldBytes {
		t.Errorf("line is %d bytes, want at most %d", len(line), 3*maxFieldBytes)
	}
	want := "[2026-11-28 10:15:04] [" + strings.Repeat("é", maxFieldBytes/2) + "…] "
	if !strings.HasPrefix(line, want) {
		t.Errorf("line starts %q", line[:60])
	}
	if !strings.HasSuffix(line, "… (ID: a) [Received #1 from pub-sub]\n") {
		t.Errorf("line ends %q", line[len(line)-60:])
	}
}

// writeCounter records each Write separately.
type writeCounter struct {
	mu     sync.Mutex
	writes []string
}

func (w *writeCounter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.writes = append(w.writes, string(p))
	return len(p), nil
}

// Two listeners display at once: the shared counter never skips or repeats, numbers
// appear in order, and every line is one Write (flushed whole, never interleaved).
func TestHandleSharedCounter(t *testing.T) {
	out := &writeCounter{}
	logs := &syncBuffer{}
	s := NewSubscriber(DefaultConfig(), out, NewLogger("text", logs))
	t.Cleanup(func() { _ = s.client.Close() })
	const perSource = 200
	var wg sync.WaitGroup
	for _, source := range []string{SourcePubSub, SourceQueue} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perSource {
				s.handle(fmt.Sprintf(`{"id":"%d","timestamp":"2026-11-28T10:15:04Z","message":"m","sender":"s","count":%d}`, i, i), source, "list")
				s.handle(`{"count":"x"}`, source, "list")
			}
		}()
	}
	wg.Wait()
	if got := s.Received(); got != 2*perSource {
		t.Fatalf("Received() = %d, want %d", got, 2*perSource)
	}
	if len(out.writes) != 2*perSource {
		t.Fatalf("%d writes, want %d", len(out.writes), 2*perSource)
	}
	for i, w := range out.writes {
		suffix1 := fmt.Sprintf("[Received #%d from pub-sub]\n", i+1)
		suffix2 := fmt.Sprintf("[Received #%d from queue]\n", i+1)
		if strings.Count(w, "\n") != 1 || !(strings.HasSuffix(w, suffix1) || strings.HasSuffix(w, suffix2)) {
			t.Fatalf("write %d = %q", i, w)
		}
	}
	texts := logTexts(logs)
	if len(texts) != 2*perSource {
		t.Fatalf("%d log lines, want %d", len(texts), 2*perSource)
	}
	for _, text := range texts {
		if !strings.HasPrefix(text, "Failed to parse message from ") ||
			!strings.HasSuffix(text, ": json: cannot unmarshal string into Go struct field Message.count of type int") {
			t.Fatalf("log line %q", text)
		}
	}
}
