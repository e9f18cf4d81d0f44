// Command go-subscriber is the tutorial's Go listener: it displays every message
// published on a Redis pub/sub channel and/or pushed to a Redis list, and can watch
// the order events as well. See README.md for the environment variables.
package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"syscall"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel"
)

func main() {
	// Logs go to stdout (12-factor), not the std logger's default stderr.
	log.SetOutput(os.Stdout)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		// After the first signal, restore the default handling: the first one stops
		// gracefully, a second one ends the process at once.
		<-ctx.Done()
		stop()
	}()

	code := run(ctx, os.Getenv, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run is the whole program minus the process plumbing; it returns the exit code.
// Display and log lines go to stdout; a configuration error is one line on stderr.
func run(ctx context.Context, getenv func(string) string, stdout, stderr io.Writer) int {
	cfg, err := LoadConfig(getenv)
	if err != nil {
		fmt.Fprintf(stderr, "go-subscriber: %v\n", err)
		return ExitBadConfig
	}
	logger := NewLogger(cfg.LogFormat, stdout)
	redis.SetLogger(newRedisLogger(logger))
	// OpenTelemetry's export errors (collector down, refused) go to the same log,
	// an identical one at most every 10 s, instead of stderr.
	otelLog := newOTelLogger(logger)
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
		otelLog.Printf(context.Background(), "%v", err)
	}))

	if err := NewSubscriber(cfg, stdout, logger).Run(ctx); err != nil {
		logger.Fatalf("Subscriber failed: %v", err)
		return ExitNoRedis
	}
	return ExitOK
}
