package main

import (
	"context"
	"strconv"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// Tracing is the optional OpenTelemetry side of the subscriber: one consumer span per
// received message, a child of the envelope's traceparent when it has one, exported
// over OTLP/HTTP (protobuf) in batches. It exists only when OTEL_EXPORTER_OTLP_ENDPOINT
// is set; otherwise the subscriber holds a nil *Tracing and does no tracing work at
// all on the hot path.
//
// Spans follow the parent's sampling decision (a traceparent with flags 00 is not
// exported) and are queued without ever blocking a listener: when the export queue
// is full (collector down or slow), spans are dropped, never messages.
type Tracing struct {
	provider *sdktrace.TracerProvider
	tracer   trace.Tracer
}

// DefaultServiceName is the service.name of the exported spans; OTEL_SERVICE_NAME or
// OTEL_RESOURCE_ATTRIBUTES (read by OpenTelemetry) override it.
const DefaultServiceName = "go-subscriber"

// instrumentationName names this code as the spans' instrumentation scope.
const instrumentationName = "github.com/redis-order-events/go-subscriber"

// NewTracing builds the exporter and tracer provider for endpoint, the OTLP base URL
// (OTEL_EXPORTER_OTLP_ENDPOINT); spans go to <endpoint>/v1/traces, as the OTLP
// specification says for that variable. Nothing connects until the first export.
func NewTracing(ctx context.Context, endpoint string) (*Tracing, error) {
	exporter, err := otlptracehttp.New(ctx, otlptracehttp.WithEndpointURL(tracesURL(endpoint)))
	if err != nil {
		return nil, err
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(attribute.String("service.name", DefaultServiceName)),
		resource.WithFromEnv(), // later detectors win: OTEL_SERVICE_NAME overrides the default
		resource.WithTelemetrySDK(),
	)
	if err != nil {
		return nil, err
	}
	provider := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exporter), sdktrace.WithResource(res))
	return &Tracing{provider: provider, tracer: provider.Tracer(instrumentationName)}, nil
}

// tracesURL is the OTLP/HTTP traces URL of a base endpoint URL.
func tracesURL(endpoint string) string {
	return strings.TrimSuffix(endpoint, "/") + "/v1/traces"
}

// Start begins the span of one received message: kind consumer, named
// "receive <destination>", continuing the remote parent when parent is valid (a new
// trace otherwise). The caller ends it once the message is displayed.
func (t *Tracing) Start(parent trace.SpanContext, msg Message, source, destination string) trace.Span {
	ctx := context.Background()
	if parent.IsValid() {
		ctx = trace.ContextWithRemoteSpanContext(ctx, parent)
	}
	attrs := []attribute.KeyValue{
		attribute.String("messaging.system", "redis"),
		attribute.String("messaging.operation.type", "receive"),
		attribute.String("messaging.destination.name", destination),
		attribute.String("messaging.message.id", msg.ID),
		attribute.String("go_subscriber.source", source),
	}
	if msg.Type != "" {
		attrs = append(attrs,
			attribute.String("event.type", msg.Type),
			attribute.String("order.id", strconv.Itoa(msg.Count)))
	}
	_, span := t.tracer.Start(ctx, "receive "+destination,
		trace.WithSpanKind(trace.SpanKindConsumer), trace.WithAttributes(attrs...))
	return span
}

// Shutdown exports the spans still queued and stops the exporter. Call it once, after
// the listeners have stopped.
func (t *Tracing) Shutdown(ctx context.Context) error {
	return t.provider.Shutdown(ctx)
}
