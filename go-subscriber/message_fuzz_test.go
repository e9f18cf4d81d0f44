package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"
)

// Fuzz targets for everything the subscriber does with bytes it did not produce.
// `go test` runs the seed corpus below and in testdata/fuzz/<Target>/ as ordinary
// tests; `go test -fuzz=FuzzParseMessage` (or FuzzDisplay) searches for new inputs,
// and any it finds failing is saved to testdata/fuzz/ and replayed from then on.

// fuzzSeeds are payloads from the contract and from the hostile shapes that matter:
// wrong types, invalid UTF-8, control characters, deep nesting, huge fields.
var fuzzSeeds = []string{
	`{"id":"a","timestamp":"2026-11-28T10:15:02.123456+00:00","message":"Hello from Python #7","sender":"python-publisher","count":7}`,
	`{"id":"e","timestamp":"2026-11-28T10:15:02Z","message":"Order 1 placed","sender":"orders-api","count":1,"type":"OrderPlaced","version":1,"data":{"order_id":1}}`,
	`{"id":"a","timestamp":"2025-03-29T08:32:00.123456","message":"m","sender":"s","count":1}`,
	`{"id":"s","message":"m","type":"ShipmentBooked","version":1,"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","data":{"order_id":1,"shipment_id":"\u001b[2J","carrier":"` + strings.Repeat("c", 3*maxFieldBytes) + `","tracking_number":"t\nu"}}`,
	`{"type":"OrderPlaced","version":1,"data":{"order_id":1,"customer_email":"e","currency":"EUR","total":"1","lines":[{"quantity":-5}]}}`,
	`{"type":"CustomerNotified","version":1,"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n","data":null}`,
	`{"count":"seven"}`,
	`{"version":"1","type":7}`,
	`{"count":1e400}`,
	`{"message":"\u001b[31mred\u001b[0m\nsecond line\r\u0000"}`,
	"{\"message\":\"\xff\xfe invalid utf-8\"}",
	`{"data":` + strings.Repeat("[", 10000) + strings.Repeat("]", 10000) + `}`,
	`{"message":"` + strings.Repeat("x", 3*maxFieldBytes) + `"}`,
	`null`, `42`, `"a string"`, `[]`, ``, `   `, `{`, `{"id":`, "\x00",
}

func FuzzParseMessage(f *testing.F) {
	for _, seed := range fuzzSeeds {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		msg, err := ParseMessage(payload) // must not panic, whatever the bytes
		if err != nil {
			if strings.ContainsFunc(err.Error(), func(r rune) bool { return r == '\n' }) {
				t.Errorf("error spans lines: %q", err)
			}
			return
		}
		trimmed := bytes.TrimSpace(payload)
		if !json.Valid(trimmed) || trimmed[0] != '{' {
			t.Errorf("accepted %q, which is not a JSON object", payload)
		}
		checkLine(t, DisplayLine(msg, 1, SourceQueue, receivedAt))
	})
}

func FuzzDisplay(f *testing.F) {
	f.Add("a", "2026-11-28T10:15:02Z", "Hello from Python #1", "python-publisher", 1)
	f.Add("\x1b[2J", "not a time", "line\nbreak\r\x00", "\u202e\u200b", -1)
	f.Add("\xff", "2025-03-29T08:32:00.123456", strings.Repeat("é", maxFieldBytes), "\xc3", 1<<62)
	f.Fuzz(func(t *testing.T, id, timestamp, message, sender string, count int) {
		msg := Message{ID: id, Timestamp: timestamp, Message: message, Sender: sender, Count: count}
		checkLine(t, DisplayLine(msg, count, SourcePubSub, receivedAt))
	})
}

// checkLine asserts what a display line always is: one line of valid UTF-8, no control
// characters but its final newline, and bounded in length however long the fields were.
func checkLine(t *testing.T, line string) {
	t.Helper()
	if !strings.HasSuffix(line, "\n") {
		t.Fatalf("line does not end with a newline: %q", line)
	}
	body := strings.TrimSuffix(line, "\n")
	for _, r := range body {
		if unicode.IsControl(r) {
			t.Fatalf("control character %U in %q", r, body)
		}
	}
	if max := 3*(maxFieldBytes+len("…")) + 200; len(line) > max {
		t.Fatalf("line is %d bytes, more than %d", len(line), max)
	}
	if !utf8.ValidString(line) {
		t.Fatalf("line is not valid UTF-8: %q", line)
	}
}
