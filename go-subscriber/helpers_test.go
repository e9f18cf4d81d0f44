package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// defaultTestDB is the database the Redis tests flush when REDIS_TEST_DB is unset;
// tools/test.sh sets REDIS_TEST_DB=1, away from the Python tests' database 0.
const defaultTestDB = 15

// syncBuffer is a bytes.Buffer safe for the listeners' goroutines and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// lines is the buffer's complete lines.
func (s *syncBuffer) lines() []string {
	text := strings.TrimSuffix(s.String(), "\n")
	if text == "" {
		return nil
	}
	return strings.Split(text, "\n")
}

// logTexts strips the "2006/01/02 15:04:05 [<RFC 3339>] " prefix of every text log
// line, leaving what the code logged.
func logTexts(buf *syncBuffer) []string {
	var out []string
	for _, line := range buf.lines() {
		if _, rest, ok := strings.Cut(line, "] "); ok && strings.Contains(line, " [") {
			out = append(out, rest)
		} else {
			out = append(out, line)
		}
	}
	return out
}

// redisTestEnv returns the test Redis address and database. Without REDIS_TEST_ADDR
// the test is skipped locally but fails when CI is set: a missing Redis must never
// pass CI silently.
func redisTestEnv(t testing.TB) (addr string, db int) {
	t.Helper()
	addr = os.Getenv("REDIS_TEST_ADDR")
	if addr == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("REDIS_TEST_ADDR is not set but CI is: the Redis tests must run in CI (use `make test`)")
		}
		t.Skip("REDIS_TEST_ADDR not set: skipping a test that needs Redis (run `make test`)")
	}
	db = defaultTestDB
	if v := os.Getenv("REDIS_TEST_DB"); v != "" {
		var err error
		if db, err = strconv.Atoi(v); err != nil {
			t.Fatalf("REDIS_TEST_DB=%q: %v", v, err)
		}
	}
	return addr, db
}

// setupRedis connects a helper client to the test database, flushes it, and returns
// it with a subscriber Config pointing at the same database. Pub/sub channels are
// server-wide, so each test gets its own channel names (suffix) unless it wants
// the defaults.
func setupRedis(t testing.TB) (Config, *redis.Client) {
	t.Helper()
	addr, db := redisTestEnv(t)
	client := redis.NewClient(&redis.Options{Addr: addr, DB: db})
	t.Cleanup(func() { _ = client.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := client.FlushDB(ctx).Err(); err != nil {
		t.Fatalf("FLUSHDB on test Redis %s db %d: %v", addr, db, err)
	}
	cfg := DefaultConfig()
	cfg.Addr = addr
	cfg.DB = db
	cfg.ConnectAttempts = 1
	return cfg, client
}

// uniqueName is a channel or list name no other test (or process) uses.
func uniqueName(t *testing.T, base string) string {
	return base + ":test:" + t.Name() + ":" + strconv.FormatInt(time.Now().UnixNano(), 36)
}

// runningSubscriber is a Subscriber running in a goroutine, with captured output.
type runningSubscriber struct {
	sub    *Subscriber
	out    *syncBuffer // display lines
	logs   *syncBuffer // log lines
	cancel context.CancelFunc
	done   chan error
}

// startSubscriber runs a Subscriber for cfg until the test stops it (or ends).
func startSubscriber(t *testing.T, cfg Config) *runningSubscriber {
	t.Helper()
	r := &runningSubscriber{out: &syncBuffer{}, logs: &syncBuffer{}, done: make(chan error, 1)}
	r.sub = NewSubscriber(cfg, r.out, NewLogger("text", r.logs))
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- r.sub.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(10 * time.Second):
			t.Errorf("subscriber did not stop within 10s")
		}
	})
	return r
}

// stop cancels the subscriber and returns how long Run took to return, and its error.
func (r *runningSubscriber) stop(t *testing.T) (time.Duration, error) {
	t.Helper()
	start := time.Now()
	r.cancel()
	select {
	case err := <-r.done:
		r.done <- err // for the cleanup
		return time.Since(start), err
	case <-time.After(10 * time.Second):
		t.Fatalf("subscriber did not stop within 10s; logs:\n%s", r.logs)
		return 0, nil
	}
}

// waitFor polls cond every 10 ms until it is true or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitSubscribed waits until the server counts a subscriber on channel, so that a
// PUBLISH from now on is delivered (no bare sleep).
func waitSubscribed(t *testing.T, client *redis.Client, channel string) {
	t.Helper()
	waitFor(t, 5*time.Second, "a subscriber on "+channel, func() bool {
		n, err := client.PubSubNumSub(context.Background(), channel).Result()
		return err == nil && n[channel] >= 1
	})
}

// waitLog waits until a log line contains text.
func (r *runningSubscriber) waitLog(t *testing.T, text string) {
	t.Helper()
	waitFor(t, 5*time.Second, "log line "+strconv.Quote(text), func() bool {
		return strings.Contains(r.logs.String(), text)
	})
}

// waitReceived waits until n messages were displayed.
func (r *runningSubscriber) waitReceived(t *testing.T, n int) {
	t.Helper()
	waitFor(t, 5*time.Second, strconv.Itoa(n)+" displayed messages", func() bool {
		return r.sub.Received() >= n
	})
}

// closedPort is an address where nothing listens.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	return addr
}

// tcpProxy forwards a local port to the test Redis. down() drops every connection
// and refuses new ones, as a Redis restart does; up() listens on the same port again.
type tcpProxy struct {
	target string
	addr   string

	mu    sync.Mutex
	ln    net.Listener
	conns map[net.Conn]struct{}
}

func newTCPProxy(t *testing.T, target string) *tcpProxy {
	t.Helper()
	p := &tcpProxy{target: target, addr: "127.0.0.1:0", conns: map[net.Conn]struct{}{}}
	if err := p.up(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.down)
	return p
}

func (p *tcpProxy) up() error {
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.ln, p.addr = ln, ln.Addr().String()
	p.mu.Unlock()
	go p.serve(ln)
	return nil
}

func (p *tcpProxy) serve(ln net.Listener) {
	for {
		client, err := ln.Accept()
		if err != nil {
			return
		}
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = client.Close()
			continue
		}
		p.mu.Lock()
		if p.ln != ln { // went down meanwhile
			p.mu.Unlock()
			_ = client.Close()
			_ = server.Close()
			return
		}
		p.conns[client], p.conns[server] = struct{}{}, struct{}{}
		p.mu.Unlock()
		pipe := func(dst, src net.Conn) {
			_, _ = io.Copy(dst, src)
			_ = dst.Close()
			_ = src.Close()
		}
		go pipe(server, client)
		go pipe(client, server)
	}
}

func (p *tcpProxy) down() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		_ = p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		_ = c.Close()
	}
	clear(p.conns)
}
