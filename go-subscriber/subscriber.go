package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/trace"
)

// Subscriber displays every message arriving on the configured pub/sub channels and
// lists. Build it with NewSubscriber, then call Run once.
type Subscriber struct {
	cfg    Config
	client redis.UniversalClient // *redis.Client, or *redis.ClusterClient (REDIS_CLUSTER=1)
	addr   string                // host:port for log lines, never a password
	out    io.Writer             // display lines
	log    Logger
	now    func() time.Time
	// tracing exports a span per message; nil (no OTEL_EXPORTER_OTLP_ENDPOINT) means off.
	tracing *Tracing

	mu       sync.Mutex // guards received and serialises writes to out
	received int
}

// NewSubscriber builds a subscriber and its Redis client; it does not connect.
// Display lines go to out, log lines to logger.
// With cfg.OTLPEndpoint set it also builds the span exporter (it connects on the
// first export); if that fails, the subscriber logs why and runs without tracing.
func NewSubscriber(cfg Config, out io.Writer, logger Logger) *Subscriber {
	opts := cfg.RedisOptions()
	s := &Subscriber{
		cfg:    cfg,
		client: cfg.NewClient(),
		addr:   opts.Addr,
		out:    out,
		log:    logger,
		now:    time.Now,
	}
	if cfg.OTLPEndpoint != "" {
		tracing, err := NewTracing(context.Background(), cfg.OTLPEndpoint)
		if err != nil {
			logger.Errorf("Tracing off: %v", err)
		} else {
			s.tracing = tracing
		}
	}
	return s
}

// Received is the number of messages displayed so far, from every source.
func (s *Subscriber) Received() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.received
}

// Run connects (with retries), listens until ctx is cancelled, then stops the
// listeners, prints the total and closes the client. It returns an error only when
// Redis could not be reached; a cancellation while connecting is a normal stop.
func (s *Subscriber) Run(ctx context.Context) error {
	s.log.Infof("Starting Go Subscriber...")
	s.log.Infof("Pattern: %s", s.cfg.Pattern)

	if err := s.connectWithRetries(ctx); err != nil {
		if ctx.Err() == nil {
			s.closeClient()
			s.shutdownTracing()
			return err
		}
		// Stopped while waiting for Redis: the normal shutdown lines, nothing received.
	}

	// The listeners get their own context, cancelled only after the shutdown line
	// is logged, so the lines come in the original's order.
	listenCtx, stopListeners := context.WithCancel(context.WithoutCancel(ctx))
	defer stopListeners()
	var wg sync.WaitGroup
	listen := func(fn func(context.Context, string), name string) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn(listenCtx, name)
		}()
	}
	if ctx.Err() == nil {
		if s.cfg.Pattern == PatternPubSub || s.cfg.Pattern == PatternBoth {
			listen(s.listenChannel, s.cfg.Channel)
		}
		if s.cfg.Pattern == PatternQueue || s.cfg.Pattern == PatternBoth {
			listen(s.listenQueue, s.cfg.Queue)
		}
		// Order watching is opt-in by its own variables, whatever PATTERN says.
		if s.cfg.OrderChannel != "" {
			listen(s.listenChannel, s.cfg.OrderChannel)
		}
		if s.cfg.OrderQueue != "" {
			listen(s.listenQueue, s.cfg.OrderQueue)
		}
	}

	<-ctx.Done()
	s.log.Infof("Received shutdown signal. Shutting down gracefully...")
	stopListeners()
	// Order matters: the listeners use the client, so wait for them before closing it.
	// A queue listener returns within PollTimeout (its BLPOP's timeout).
	wg.Wait()
	s.log.Infof("Subscriber stopped. Total messages received: %d", s.Received())
	s.closeClient()
	s.shutdownTracing()
	return nil
}

// tracingShutdownTimeout bounds the final export of queued spans at shutdown.
const tracingShutdownTimeout = 5 * time.Second

// shutdownTracing exports the spans still queued (after every listener stopped).
func (s *Subscriber) shutdownTracing() {
	if s.tracing == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), tracingShutdownTimeout)
	defer cancel()
	if err := s.tracing.Shutdown(ctx); err != nil {
		s.log.Errorf("Error exporting the last spans: %v", err)
	}
}

func (s *Subscriber) closeClient() {
	if err := s.client.Close(); err != nil {
		s.log.Errorf("Error closing Redis client: %v", err)
	}
}

// connect PINGs Redis once.
func (s *Subscriber) connect(ctx context.Context) error {
	if err := s.client.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("failed to connect to Redis: %w", err)
	}
	s.log.Infof("Connected to Redis at %s", s.addr)
	return nil
}

// connectWithRetries tries connect ConnectAttempts times, ConnectRetryDelay apart
// (not after the last). It returns ctx.Err() if ctx is cancelled meanwhile.
func (s *Subscriber) connectWithRetries(ctx context.Context) error {
	attempts := s.cfg.ConnectAttempts
	for attempt := 1; attempt <= attempts; attempt++ {
		err := s.connect(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		s.log.Errorf("Connection attempt %d/%d failed: %v", attempt, attempts, err)
		if attempt < attempts && !sleep(ctx, s.cfg.ConnectRetryDelay) {
			return ctx.Err()
		}
	}
	return fmt.Errorf("failed to connect after %d attempts", attempts)
}

// listenChannel displays every message published on channel until ctx is done.
// go-redis reconnects and resubscribes by itself if Redis restarts.
func (s *Subscriber) listenChannel(ctx context.Context, channel string) {
	s.log.Infof("Starting pub-sub subscriber on channel '%s'", channel)
	pubsub := s.client.Subscribe(ctx, channel)
	defer pubsub.Close()

	if _, err := pubsub.Receive(ctx); err != nil {
		s.log.Errorf("Failed to confirm subscription: %v", err)
		return
	}
	s.log.Infof("Successfully subscribed to '%s' channel", channel)

	ch := pubsub.Channel()
	for {
		select {
		case <-ctx.Done():
			s.log.Infof("Pub-sub subscriber shutting down")
			return
		case msg, ok := <-ch:
			if !ok { // the PubSub was closed under us
				return
			}
			s.handle(msg.Payload, SourcePubSub, channel)
		}
	}
}

// listenQueue pops and displays list's messages in order until ctx is done. BLPOP
// blocks at most PollTimeout, so a shutdown is noticed within that time; a Redis
// error (e.g. a restart) is logged and retried after ErrorBackoff.
func (s *Subscriber) listenQueue(ctx context.Context, list string) {
	s.log.Infof("Starting queue subscriber on list '%s'", list)
	for {
		select {
		case <-ctx.Done():
			s.log.Infof("Queue subscriber shutting down")
			return
		default:
		}
		result, err := s.client.BLPop(ctx, s.cfg.PollTimeout, list).Result()
		if err != nil {
			if errors.Is(err, redis.Nil) || errors.Is(err, context.Canceled) {
				continue
			}
			s.log.Errorf("Error in BLPOP: %v", err)
			sleep(ctx, s.cfg.ErrorBackoff)
			continue
		}
		if len(result) == 2 { // [list, value]
			s.handle(result[1], SourceQueue, list)
		}
	}
}

// handle parses and displays one payload received from source ("pub-sub" or
// "queue") on destination (the channel or list); a bad payload is logged and
// skipped. Known event data that cannot be read is logged and shown by its message.
func (s *Subscriber) handle(payload, source, destination string) {
	msg, err := ParseMessage([]byte(payload))
	if err != nil {
		s.log.Errorf("Failed to parse message from %s: %v", source, err)
		return
	}
	parent := msg.RemoteSpanContext()
	var span trace.Span
	if s.tracing != nil {
		span = s.tracing.Start(parent, msg, source, destination)
		defer span.End()
	}
	summary, err := msg.Summary()
	if err != nil {
		s.log.Errorf("Unreadable %s from %s, shown as its message: %v", msg.Type, source, clean(err.Error()))
	}
	// Counting and writing under one lock: numbers appear in order, and each line
	// is a single Write, never interleaved with another listener's.
	s.mu.Lock()
	defer s.mu.Unlock()
	s.received++
	_, _ = io.WriteString(s.out, displayLine(msg, summary, parent, s.received, source, s.now()))
}

// sleep waits d or until ctx is done; it reports whether the full d elapsed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
