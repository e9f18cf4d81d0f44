package main

// Integration tests against a real Redis server (REDIS_TEST_ADDR, see helpers_test.go).

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

func hello(n int, ts string) string {
	return fmt.Sprintf(`{"id":"id-%d","timestamp":%q,"message":"Hello from Python #%d","sender":"python-publisher","count":%d}`, n, ts, n, n)
}

// checkLogOrder fails unless want appear in the log lines in this order (other
// lines may come between).
func checkLogOrder(t *testing.T, logs *syncBuffer, want ...string) {
	t.Helper()
	texts := logTexts(logs)
	i := 0
	for _, text := range texts {
		if i < len(want) && text == want[i] {
			i++
		}
	}
	if i < len(want) {
		t.Errorf("log line %q missing or out of order; logs:\n%s", want[i], strings.Join(texts, "\n"))
	}
}

func TestPubSubDisplaysPublishedMessage(t *testing.T) {
	cfg, client := setupRedis(t)
	cfg.Pattern = PatternPubSub // default channel name: the original's log lines
	r := startSubscriber(t, cfg)
	waitSubscribed(t, client, "messages")
	r.waitLog(t, "Successfully subscribed to 'messages' channel")

	payload, err := os.ReadFile("../contracts/examples/hello.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := client.Publish(context.Background(), "messages", payload).Err(); err != nil {
		t.Fatal(err)
	}
	r.waitReceived(t, 1)
	want := "[2026-11-28 10:15:02] [python-publisher] Hello from Python #7 (ID: 7d1c1c1e-8a3f-4a57-9d38-1b5b0e0f4c2a) [Received #1 from pub-sub]\n"
	if got := r.out.String(); got != want {
		t.Errorf("display\n got %q\nwant %q", got, want)
	}
	if _, err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	checkLogOrder(t, r.logs,
		"Starting Go Subscriber...",
		"Pattern: pubsub",
		"Connected to Redis at "+cfg.Addr,
		"Starting pub-sub subscriber on channel 'messages'",
		"Successfully subscribed to 'messages' channel",
		"Received shutdown signal. Shutting down gracefully...",
		"Pub-sub subscriber shutting down",
		"Subscriber stopped. Total messages received: 1",
	)
	if strings.Contains(r.logs.String(), "Queue subscriber") {
		t.Error("PATTERN=pubsub started a queue listener")
	}
}

func TestQueueConsumesInOrder(t *testing.T) {
	cfg, client := setupRedis(t)
	cfg.Pattern = PatternQueue // default list name: message_queue in DB cfg.DB
	ctx := context.Background()
	for n := 1; n <= 3; n++ { // waiting before the subscriber starts
		client.RPush(ctx, "message_queue", hello(n, "2026-11-28T10:15:0"+fmt.Sprint(n)+"Z"))
	}
	r := startSubscriber(t, cfg)
	r.waitReceived(t, 3)
	for n := 4; n <= 6; n++ { // arriving while it listens
		client.RPush(ctx, "message_queue", hello(n, "2026-11-28T10:15:0"+fmt.Sprint(n)+"Z"))
	}
	r.waitReceived(t, 6)

	var want []string
	for n := 1; n <= 6; n++ {
		want = append(want, fmt.Sprintf("[2026-11-28 10:15:0%d] [python-publisher] Hello from Python #%d (ID: id-%d) [Received #%d from queue]", n, n, n, n))
	}
	if got := r.out.lines(); !slices.Equal(got, want) {
		t.Errorf("display\n got %q\nwant %q", got, want)
	}
	if n, err := client.LLen(ctx, "message_queue").Result(); err != nil || n != 0 {
		t.Errorf("LLEN message_queue = %d, %v; want 0", n, err)
	}
	if _, err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	checkLogOrder(t, r.logs,
		"Pattern: queue",
		"Starting queue subscriber on list 'message_queue'",
		"Received shutdown signal. Shutting down gracefully...",
		"Queue subscriber shutting down",
		"Subscriber stopped. Total messages received: 6",
	)
}

func TestQueueSkipsInvalidMessages(t *testing.T) {
	cfg, client := setupRedis(t)
	cfg.Pattern = PatternQueue
	cfg.Queue = "hello_list" // QUEUE override
	ctx := context.Background()
	client.RPush(ctx, "hello_list",
		"not json",
		`{"id":"x","count":"x"}`,
		strings.Repeat("[", 100000), // deep nesting
		"\x00\xff\xfe",
		hello(1, "2025-03-29T08:32:00.123456"),
	)
	r := startSubscriber(t, cfg)
	r.waitReceived(t, 1)
	want := "[2025-03-29 08:32:00] [python-publisher] Hello from Python #1 (ID: id-1) [Received #1 from queue]\n"
	if got := r.out.String(); got != want {
		t.Errorf("display\n got %q\nwant %q", got, want)
	}
	if _, err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	var failures []string
	for _, text := range logTexts(r.logs) {
		if strings.HasPrefix(text, "Failed to parse message from queue: ") {
			failures = append(failures, text)
		}
	}
	if len(failures) != 4 {
		t.Errorf("%d parse failures logged, want 4: %q", len(failures), failures)
	}
	checkLogOrder(t, r.logs,
		"Starting queue subscriber on list 'hello_list'",
		"Failed to parse message from queue: invalid character 'o' in literal null (expecting 'u')",
		"Failed to parse message from queue: json: cannot unmarshal string into Go struct field Message.count of type int",
		"Subscriber stopped. Total messages received: 1",
	)
}

func TestPubSubSkipsInvalidMessages(t *testing.T) {
	cfg, client := setupRedis(t)
	cfg.Pattern = PatternPubSub
	cfg.Channel = uniqueName(t, "messages") // CHANNEL override
	r := startSubscriber(t, cfg)
	waitSubscribed(t, client, cfg.Channel)
	ctx := context.Background()
	client.Publish(ctx, cfg.Channel, `{"count":"x"}`)
	client.Publish(ctx, cfg.Channel, hello(2, "2026-11-28T10:15:02Z"))
	r.waitReceived(t, 1)
	if _, err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	if got, want := r.out.String(), "[2026-11-28 10:15:02] [python-publisher] Hello from Python #2 (ID: id-2) [Received #1 from pub-sub]\n"; got != want {
		t.Errorf("display\n got %q\nwant %q", got, want)
	}
	checkLogOrder(t, r.logs,
		"Starting pub-sub subscriber on channel '"+cfg.Channel+"'",
		"Successfully subscribed to '"+cfg.Channel+"' channel",
		"Failed to parse message from pub-sub: json: cannot unmarshal string into Go struct field Message.count of type int",
	)
}

func TestOrderWatching(t *testing.T) {
	cfg, client := setupRedis(t)
	cfg.Pattern = PatternQueue // order watching does not depend on PATTERN
	cfg.Queue = "hello_list"
	cfg.OrderChannel = uniqueName(t, "orders:events")
	cfg.OrderQueue = "orders:display"
	order, err := os.ReadFile("../contracts/examples/order_placed.json")
	if err != nil {
		t.Fatal(err)
	}
	r := startSubscriber(t, cfg)
	waitSubscribed(t, client, cfg.OrderChannel)
	ctx := context.Background()
	client.Publish(ctx, cfg.OrderChannel, order)
	r.waitReceived(t, 1)
	client.RPush(ctx, cfg.OrderQueue, order)
	r.waitReceived(t, 2)
	client.RPush(ctx, cfg.Queue, hello(3, "2026-11-28T10:15:05Z"))
	r.waitReceived(t, 3)
	if _, err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	orderLine := "[2026-11-28 10:15:04] [orders-api] Order 42 placed by ada@example.com: 2 items, 25.00 EUR (ID: 3f0e2b8c-5d1a-4c9e-8f7b-2a6d9c4e1b70)"
	want := []string{
		orderLine + " [Received #1 from pub-sub]",
		orderLine + " [Received #2 from queue]",
		"[2026-11-28 10:15:05] [python-publisher] Hello from Python #3 (ID: id-3) [Received #3 from queue]",
	}
	if got := r.out.lines(); !slices.Equal(got, want) {
		t.Errorf("display\n got %q\nwant %q", got, want)
	}
	checkLogOrder(t, r.logs, "Successfully subscribed to '"+cfg.OrderChannel+"' channel")
	checkLogOrder(t, r.logs, "Starting queue subscriber on list 'orders:display'")
	checkLogOrder(t, r.logs, "Starting queue subscriber on list 'hello_list'")
	checkLogOrder(t, r.logs, "Subscriber stopped. Total messages received: 3")
	if strings.Contains(r.logs.String(), "channel '"+DefaultChannel+"'") {
		t.Error("PATTERN=queue subscribed to the Hello channel")
	}
}

// Shutdown with both listeners busy returns within the BLPOP timeout (+ margin) and
// reports the right total.
func TestShutdownIsPrompt(t *testing.T) {
	cfg, client := setupRedis(t)
	cfg.Pattern = PatternBoth
	cfg.Channel = uniqueName(t, "messages")
	r := startSubscriber(t, cfg)
	waitSubscribed(t, client, cfg.Channel)
	ctx := context.Background()
	for n := 1; n <= 3; n++ {
		client.RPush(ctx, cfg.Queue, hello(n, "2026-11-28T10:15:02Z"))
		client.Publish(ctx, cfg.Channel, hello(10+n, "2026-11-28T10:15:02Z"))
	}
	r.waitReceived(t, 6)
	// Let the queue listener sit in a fresh BLPOP before stopping.
	time.Sleep(100 * time.Millisecond)
	took, err := r.stop(t)
	if err != nil {
		t.Fatal(err)
	}
	if took > 1500*time.Millisecond {
		t.Errorf("shutdown took %s, want <= 1.5s", took)
	}
	if got := len(r.out.lines()); got != 6 {
		t.Errorf("%d display lines, want 6", got)
	}
	texts := logTexts(r.logs)
	if last := texts[len(texts)-1]; last != "Subscriber stopped. Total messages received: 6" {
		t.Errorf("last log line = %q", last)
	}
	checkLogOrder(t, r.logs,
		"Received shutdown signal. Shutting down gracefully...",
		"Subscriber stopped. Total messages received: 6",
	)
	for _, want := range []string{"Pub-sub subscriber shutting down", "Queue subscriber shutting down"} {
		checkLogOrder(t, r.logs, "Received shutdown signal. Shutting down gracefully...", want)
	}
}

// Redis goes away after the subscriber connected (a restart, simulated by a proxy
// dropping every connection and refusing new ones), then comes back: the BLPOP loop
// logs and retries, pub/sub resubscribes, and both display messages again.
func TestSurvivesRedisRestart(t *testing.T) {
	cfg, client := setupRedis(t)
	proxy := newTCPProxy(t, cfg.Addr)
	cfg.Addr = proxy.addr
	cfg.Pattern = PatternBoth
	cfg.Channel = uniqueName(t, "messages")
	cfg.ErrorBackoff = 200 * time.Millisecond
	r := startSubscriber(t, cfg)
	waitSubscribed(t, client, cfg.Channel)
	ctx := context.Background()
	client.Publish(ctx, cfg.Channel, hello(1, "2026-11-28T10:15:01Z"))
	client.RPush(ctx, cfg.Queue, hello(2, "2026-11-28T10:15:02Z"))
	r.waitReceived(t, 2)

	proxy.down()
	r.waitLog(t, "Error in BLPOP: ")
	waitFor(t, 5*time.Second, "the server to drop the subscription", func() bool {
		n, err := client.PubSubNumSub(ctx, cfg.Channel).Result()
		return err == nil && n[cfg.Channel] == 0
	})
	if err := proxy.up(); err != nil {
		t.Fatalf("proxy back on %s: %v", proxy.addr, err)
	}

	waitSubscribed(t, client, cfg.Channel) // go-redis resubscribed by itself
	client.Publish(ctx, cfg.Channel, hello(3, "2026-11-28T10:15:03Z"))
	r.waitReceived(t, 3)
	client.RPush(ctx, cfg.Queue, hello(4, "2026-11-28T10:15:04Z"))
	r.waitReceived(t, 4)
	if _, err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	lines := r.out.lines()
	if len(lines) != 4 ||
		!strings.HasSuffix(lines[2], "Hello from Python #3 (ID: id-3) [Received #3 from pub-sub]") ||
		!strings.HasSuffix(lines[3], "Hello from Python #4 (ID: id-4) [Received #4 from queue]") {
		t.Errorf("display lines %q", lines)
	}
	checkLogOrder(t, r.logs, "Subscriber stopped. Total messages received: 4")
}

// A closed port: every attempt fails with the original's line, the delay is waited
// between attempts only, and Run returns the original's error.
func TestConnectFailureRetries(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Addr = closedPort(t)
	cfg.ConnectAttempts = 3
	cfg.ConnectRetryDelay = 100 * time.Millisecond
	out, logs := &syncBuffer{}, &syncBuffer{}
	start := time.Now()
	err := NewSubscriber(cfg, out, NewLogger("text", logs)).Run(context.Background())
	took := time.Since(start)
	if err == nil || err.Error() != "failed to connect after 3 attempts" {
		t.Fatalf("Run() = %v, want 'failed to connect after 3 attempts'", err)
	}
	if took < 200*time.Millisecond || took > 5*time.Second {
		t.Errorf("took %s: want two delays of 100ms (none after the last attempt)", took)
	}
	texts := logTexts(logs)
	if len(texts) != 5 {
		t.Fatalf("log lines %q", texts)
	}
	for i, text := range texts[2:] {
		prefix := fmt.Sprintf("Connection attempt %d/3 failed: failed to connect to Redis: dial tcp %s: ", i+1, cfg.Addr)
		if !strings.HasPrefix(text, prefix) || !strings.Contains(text, "connection refused") {
			t.Errorf("log line %q, want prefix %q", text, prefix)
		}
	}
	if out.String() != "" {
		t.Errorf("display output %q", out)
	}
}

// A signal while waiting for Redis stops at once, as a normal shutdown.
func TestCancelWhileConnecting(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Addr = closedPort(t)
	logs := &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- NewSubscriber(cfg, &syncBuffer{}, NewLogger("text", logs)).Run(ctx) }()
	waitFor(t, 5*time.Second, "the first failed attempt", func() bool {
		return strings.Contains(logs.String(), "Connection attempt 1/5 failed")
	})
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run() = %v, want nil", err)
		}
	case <-time.After(time.Second):
		t.Fatal("Run did not return within 1s of cancel (still sleeping 5s?)")
	}
	checkLogOrder(t, logs,
		"Received shutdown signal. Shutting down gracefully...",
		"Subscriber stopped. Total messages received: 0",
	)
}
