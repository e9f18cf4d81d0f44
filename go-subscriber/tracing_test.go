package main

// Tracing against a real OTLP/HTTP receiver: an HTTP server in the test process that
// decodes each export request (protobuf, as a collector does) and keeps its spans.

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"
)

// otlpReceiver is an OTLP/HTTP traces endpoint: POST /v1/traces with a protobuf
// ExportTraceServiceRequest, answered with an ExportTraceServiceResponse.
type otlpReceiver struct {
	*httptest.Server

	mu       sync.Mutex
	requests int
	spans    []*tracepb.Span
	services []string // service.name of each span's resource
}

func newOTLPReceiver(t testing.TB) *otlpReceiver {
	t.Helper()
	r := &otlpReceiver{}
	r.Server = httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(r.Close)
	return r
}

func (r *otlpReceiver) serve(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodPost || req.URL.Path != "/v1/traces" || req.Header.Get("Content-Type") != "application/x-protobuf" {
		http.Error(w, "want POST /v1/traces application/x-protobuf", http.StatusNotFound)
		return
	}
	var body io.Reader = req.Body
	if req.Header.Get("Content-Encoding") == "gzip" {
		gz, err := gzip.NewReader(req.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		body = gz
	}
	raw, err := io.ReadAll(body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var export coltracepb.ExportTraceServiceRequest
	if err := proto.Unmarshal(raw, &export); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.mu.Lock()
	r.requests++
	for _, rs := range export.GetResourceSpans() {
		service := attr(rs.GetResource().GetAttributes(), "service.name")
		for _, ss := range rs.GetScopeSpans() {
			for _, span := range ss.GetSpans() {
				r.spans = append(r.spans, span)
				r.services = append(r.services, service)
			}
		}
	}
	r.mu.Unlock()
	out, _ := proto.Marshal(&coltracepb.ExportTraceServiceResponse{})
	w.Header().Set("Content-Type", "application/x-protobuf")
	_, _ = w.Write(out)
}

func (r *otlpReceiver) received() (requests int, spans []*tracepb.Span, services []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.requests, append([]*tracepb.Span(nil), r.spans...), append([]string(nil), r.services...)
}

// attr is the string value of key among attrs ("" when absent).
func attr(attrs []*commonpb.KeyValue, key string) string {
	for _, kv := range attrs {
		if kv.GetKey() == key {
			return kv.GetValue().GetStringValue()
		}
	}
	return ""
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// An order event with a traceparent, received on the order channel, is exported as
// one consumer span in the envelope's trace, child of the envelope's span; a Hello
// message (no traceparent) starts a trace of its own. The display line carries the
// trace id; the Hello line is unchanged.
func TestTracingExportsASpanPerMessageInTheEnvelopesTrace(t *testing.T) {
	receiver := newOTLPReceiver(t)
	cfg, client := setupRedis(t)
	cfg.Pattern = PatternPubSub
	cfg.Channel = uniqueName(t, "messages")
	cfg.OrderChannel = uniqueName(t, "orders:events")
	cfg.OTLPEndpoint = receiver.URL
	r := startSubscriber(t, cfg)
	if r.sub.tracing == nil {
		t.Fatalf("no tracing with OTLPEndpoint set; logs:\n%s", r.logs)
	}
	waitSubscribed(t, client, cfg.OrderChannel)
	waitSubscribed(t, client, cfg.Channel)

	order, err := os.ReadFile("../contracts/examples/order_placed_express.json")
	if err != nil {
		t.Fatal(err)
	}
	hello, err := os.ReadFile("../contracts/examples/hello.json")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	client.Publish(ctx, cfg.OrderChannel, order)
	r.waitReceived(t, 1)
	client.Publish(ctx, cfg.Channel, hello)
	r.waitReceived(t, 2)
	if _, err := r.stop(t); err != nil { // Run's shutdown exports what is queued
		t.Fatal(err)
	}

	lines := r.out.lines()
	if len(lines) != 2 ||
		!strings.HasSuffix(lines[0], "(ID: 9b2d7c41-0e6f-4a8b-b3c5-7d18e2f4a690, trace: 4bf92f3577b34da6a3ce929d0e0e4736) [Received #1 from pub-sub]") ||
		lines[1] != strings.TrimSuffix(strings.Replace(expectedDisplay["hello.json"], "#1", "#2", 1), "\n") {
		t.Errorf("display:\n%s", strings.Join(lines, "\n"))
	}
	requests, spans, services := receiver.received()
	if requests < 1 || len(spans) != 2 {
		t.Fatalf("%d export requests with %d spans, want 2 spans; logs:\n%s", requests, len(spans), r.logs)
	}
	orderSpan, helloSpan := spans[0], spans[1]
	if attr(orderSpan.GetAttributes(), "messaging.message.id") != "9b2d7c41-0e6f-4a8b-b3c5-7d18e2f4a690" {
		orderSpan, helloSpan = helloSpan, orderSpan
	}
	checks := []struct {
		what      string
		got, want any
	}{
		{"trace id", hex.EncodeToString(orderSpan.GetTraceId()), "4bf92f3577b34da6a3ce929d0e0e4736"},
		{"parent span id", hex.EncodeToString(orderSpan.GetParentSpanId()), "00f067aa0ba902b7"},
		{"tracestate carried on", orderSpan.GetTraceState(), "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"},
		{"own span id differs", bytes.Equal(orderSpan.GetSpanId(), mustHex(t, "00f067aa0ba902b7")), false},
		{"kind", orderSpan.GetKind(), tracepb.Span_SPAN_KIND_CONSUMER},
		{"name", orderSpan.GetName(), "receive " + cfg.OrderChannel},
		{"destination", attr(orderSpan.GetAttributes(), "messaging.destination.name"), cfg.OrderChannel},
		{"system", attr(orderSpan.GetAttributes(), "messaging.system"), "redis"},
		{"event type", attr(orderSpan.GetAttributes(), "event.type"), "OrderPlaced"},
		{"order id", attr(orderSpan.GetAttributes(), "order.id"), "43"},
		{"service", services[0], DefaultServiceName},
		{"hello: a trace of its own", hex.EncodeToString(helloSpan.GetTraceId()) != "4bf92f3577b34da6a3ce929d0e0e4736", true},
		{"hello: no parent", len(helloSpan.GetParentSpanId()), 0},
		{"hello: message id", attr(helloSpan.GetAttributes(), "messaging.message.id"), "7d1c1c1e-8a3f-4a57-9d38-1b5b0e0f4c2a"},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: got %v, want %v", c.what, c.got, c.want)
		}
	}
}

// A traceparent whose sampled flag is off: the span follows the parent's decision
// and is not exported, but the trace id is still shown.
func TestTracingFollowsTheParentsSamplingDecision(t *testing.T) {
	receiver := newOTLPReceiver(t)
	cfg := DefaultConfig()
	cfg.OTLPEndpoint = receiver.URL
	out, logs := &syncBuffer{}, &syncBuffer{}
	s := NewSubscriber(cfg, out, NewLogger("text", logs))
	t.Cleanup(func() { _ = s.client.Close() })
	payload, err := os.ReadFile("../contracts/examples/payment_captured.json")
	if err != nil {
		t.Fatal(err)
	}
	unsampled := strings.Replace(string(payload), "-1a2b3c4d5e6f7081-01", "-1a2b3c4d5e6f7081-00", 1)
	s.handle(unsampled, SourceQueue, "orders:display")
	s.handle(string(payload), SourceQueue, "orders:display")
	s.shutdownTracing()
	_, spans, _ := receiver.received()
	if len(spans) != 1 || attr(spans[0].GetAttributes(), "go_subscriber.source") != SourceQueue {
		t.Errorf("%d spans exported, want only the sampled one", len(spans))
	}
	if n := strings.Count(out.String(), "trace: 4bf92f3577b34da6a3ce929d0e0e4736"); n != 2 {
		t.Errorf("trace id shown on %d lines, want 2:\n%s", n, out)
	}
}

// Without OTEL_EXPORTER_OTLP_ENDPOINT nothing is exported, even with the exporter's
// own OTEL_EXPORTER_OTLP_TRACES_ENDPOINT pointing at a live receiver: the subscriber
// builds no exporter at all. Goes through run(), as main does.
func TestNoTracingWithoutTheEndpoint(t *testing.T) {
	receiver := newOTLPReceiver(t)
	t.Setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.URL+"/v1/traces")
	cfg, client := setupRedis(t)
	list := uniqueName(t, "orders:display")
	env := map[string]string{
		"REDIS_URL":     "redis://" + cfg.Addr + "/" + strconv.Itoa(cfg.DB),
		"PATTERN":       "queue",
		"QUEUE":         uniqueName(t, "hello"),
		"ORDER_QUEUE":   list,
		"LOG_FORMAT":    "text",
		"REDIS_CLUSTER": "0",
	}
	payload, err := os.ReadFile("../contracts/examples/shipment_booked.json")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client.RPush(ctx, list, payload)
	stdout, stderr := &syncBuffer{}, &syncBuffer{}
	done := make(chan int, 1)
	go func() { done <- run(ctx, envOf(env), stdout, stderr) }()
	waitFor(t, 5*time.Second, "the shipment line", func() bool {
		return strings.Contains(stdout.String(), "Shipment booked for order #43")
	})
	cancel()
	select {
	case code := <-done:
		if code != ExitOK {
			t.Fatalf("exit %d; stderr %s", code, stderr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not stop")
	}
	if requests, _, _ := receiver.received(); requests != 0 {
		t.Errorf("%d export requests without OTEL_EXPORTER_OTLP_ENDPOINT", requests)
	}
	if !strings.Contains(stdout.String(), "trace: 4bf92f3577b34da6a3ce929d0e0e4736") {
		t.Errorf("trace id not shown without tracing:\n%s", stdout)
	}
}

// With tracing off the handler does no tracing work: the span hook is a nil check,
// so handling allocates no more than displaying the same message does.
func TestNoTracingAllocatesNothingExtra(t *testing.T) {
	if raceDetector {
		// tools/test.sh runs this test once more without -race, so it always runs.
		t.Skip("allocation counts under -race include the race detector's own")
	}
	payload, err := os.ReadFile("../contracts/examples/invoice_issued.json")
	if err != nil {
		t.Fatal(err)
	}
	s := NewSubscriber(DefaultConfig(), io.Discard, NewLogger("text", io.Discard))
	t.Cleanup(func() { _ = s.client.Close() })
	if s.tracing != nil {
		t.Fatal("tracing on without an endpoint")
	}
	// AllocsPerRun counts every goroutine's allocations (the Redis client's pool has
	// its own): the fewest of several runs is the code's own count, without that noise.
	fewest := func(f func()) float64 {
		least := testing.AllocsPerRun(200, f)
		for range 4 {
			least = min(least, testing.AllocsPerRun(200, f))
		}
		return least
	}
	display := fewest(func() {
		m, _ := ParseMessage(payload)
		_, _ = io.WriteString(io.Discard, DisplayLine(m, 1, SourceQueue, receivedAt))
	})
	text := string(payload)
	handle := fewest(func() { s.handle(text, SourceQueue, "orders:display") })
	// handle converts the string payload to bytes once more than the display path.
	if handle > display+1 {
		t.Errorf("handle allocates %.0f times per message, displaying alone %.0f", handle, display)
	}
}

// The trace part of a display line comes from OpenTelemetry's W3C parser: exactly
// version 00, 32 and 16 lower-case hex digits, two flag digits, nothing after them
// (a trailing "\n" is refused, as the schema's pattern refuses it), ids not all zero.
func TestTraceIDShownOnlyForAValidTraceparent(t *testing.T) {
	const id = "4bf92f3577b34da6a3ce929d0e0e4736"
	tests := []struct {
		name, traceparent string
		shown             bool
	}{
		{"sampled", "00-" + id + "-00f067aa0ba902b7-01", true},
		{"not sampled: still shown", "00-" + id + "-00f067aa0ba902b7-00", true},
		{"absent", "", false},
		{"trailing newline", "00-" + id + "-00f067aa0ba902b7-01\n", false},
		{"trailing space", "00-" + id + "-00f067aa0ba902b7-01 ", false},
		{"upper case", "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01", false},
		{"all-zero trace id", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", false},
		{"all-zero span id", "00-" + id + "-0000000000000000-01", false},
		{"short span id", "00-" + id + "-00f067aa0ba902-01", false},
		{"version ff", "ff-" + id + "-00f067aa0ba902b7-01", false},
		{"trace id alone", id, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			msg := Message{ID: "e", Sender: "s", Message: "m", Timestamp: "2026-11-28T10:15:02Z", Type: "Unknown", Traceparent: tt.traceparent}
			line := DisplayLine(msg, 1, SourceQueue, receivedAt)
			want := "[2026-11-28 10:15:02] [s] m (ID: e) [Received #1 from queue]\n"
			if tt.shown {
				want = "[2026-11-28 10:15:02] [s] m (ID: e, trace: " + id + ") [Received #1 from queue]\n"
			}
			if line != want {
				t.Errorf("got  %q\nwant %q", line, want)
			}
		})
	}
}
