package main

// What tracing costs, measured in one run, with and without OTEL_EXPORTER_OTLP_ENDPOINT:
//
//	REDIS_TEST_ADDR=127.0.0.1:6379 go test -run '^$' -bench 'Handle|ReceiveQueue' -benchtime 20000x -count 3
//	go test -run '^$' -bench 'TracingCost' -benchtime 20x -count 3
//
// BenchmarkHandle is the in-process hot path (parse, render, display, span);
// BenchmarkReceiveQueue is end to end: messages waiting in a real Redis list, popped
// and displayed by the running subscriber. Both report msgs/s. With tracing on, spans
// go to an OTLP/HTTP endpoint in the test process that discards them (tracing_test.go
// checks what is exported with a receiver that decodes every request).

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"
	"time"
)

// benchConfigs are the two sides of each benchmark. The receiver reads each export
// request whole and answers 200 without decoding it: a collector's own work runs in
// another process in production and is not the subscriber's cost.
func benchConfigs(b *testing.B) []struct {
	name     string
	endpoint string
} {
	receiver := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/x-protobuf")
	}))
	b.Cleanup(receiver.Close)
	return []struct {
		name     string
		endpoint string
	}{{"otel=off", ""}, {"otel=on", receiver.URL}}
}

func benchPayload(b *testing.B) string {
	payload, err := os.ReadFile("../contracts/examples/order_placed_express.json")
	if err != nil {
		b.Fatal(err)
	}
	return string(payload)
}

func BenchmarkHandle(b *testing.B) {
	payload := benchPayload(b)
	for _, bc := range benchConfigs(b) {
		b.Run(bc.name, func(b *testing.B) {
			cfg := DefaultConfig()
			cfg.OTLPEndpoint = bc.endpoint
			s := NewSubscriber(cfg, io.Discard, NewLogger("text", io.Discard))
			b.Cleanup(func() { s.shutdownTracing(); _ = s.client.Close() })
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				s.handle(payload, SourceQueue, "orders:display")
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
		})
	}
}

func BenchmarkReceiveQueue(b *testing.B) {
	payload := benchPayload(b)
	for _, bc := range benchConfigs(b) {
		b.Run(bc.name, func(b *testing.B) {
			cfg, client := setupRedis(b)
			cfg.Pattern = PatternQueue
			cfg.Queue = "bench:hello"
			cfg.OrderQueue = "bench:orders"
			cfg.OTLPEndpoint = bc.endpoint
			ctx := context.Background()
			pipe := client.Pipeline()
			for range b.N {
				pipe.RPush(ctx, cfg.OrderQueue, payload)
			}
			if _, err := pipe.Exec(ctx); err != nil {
				b.Fatal(err)
			}
			s := NewSubscriber(cfg, io.Discard, NewLogger("text", io.Discard))
			runCtx, cancel := context.WithCancel(ctx)
			done := make(chan error, 1)
			b.ResetTimer()
			go func() { done <- s.Run(runCtx) }()
			for s.Received() < b.N {
				time.Sleep(time.Millisecond)
			}
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
			cancel()
			if err := <-done; err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkTracingCost alternates batches of 1,000 messages through a subscriber
// without and one with tracing, so that both see the same machine load (a shared
// machine's load drifts more between two benchmarks than tracing costs), and reports
// both rates and their ratio.
func BenchmarkTracingCost(b *testing.B) {
	payload := benchPayload(b)
	configs := benchConfigs(b)
	subs := make([]*Subscriber, len(configs))
	for i, bc := range configs {
		cfg := DefaultConfig()
		cfg.OTLPEndpoint = bc.endpoint
		s := NewSubscriber(cfg, io.Discard, NewLogger("text", io.Discard))
		b.Cleanup(func() { s.shutdownTracing(); _ = s.client.Close() })
		subs[i] = s
	}
	const batch = 1000
	spent := make([]time.Duration, len(subs))
	n := 0
	for b.Loop() {
		for i, s := range subs {
			start := time.Now()
			for range batch {
				s.handle(payload, SourceQueue, "orders:display")
			}
			spent[i] += time.Since(start)
		}
		n += batch
	}
	off := float64(n) / spent[0].Seconds()
	on := float64(n) / spent[1].Seconds()
	b.ReportMetric(off, "off-msgs/s")
	b.ReportMetric(on, "on-msgs/s")
	b.ReportMetric(on/off, "on/off")
}

// BenchmarkRemoteSpanContext is what reading the traceparent (for the display line's
// trace id) adds to every message, with or without tracing.
func BenchmarkRemoteSpanContext(b *testing.B) {
	msg, err := ParseMessage([]byte(benchPayload(b)))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if !msg.RemoteSpanContext().IsValid() {
			b.Fatal("invalid traceparent")
		}
	}
}
