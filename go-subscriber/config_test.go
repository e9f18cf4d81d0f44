package main

import (
	"errors"
	"testing"
	"time"
)

func envOf(vars map[string]string) func(string) string {
	return func(name string) string { return vars[name] }
}

func TestLoadConfig(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		want func(*Config) // edits DefaultConfig() into the expected value
	}{
		{"defaults", nil, func(*Config) {}},
		{"empty values mean defaults", map[string]string{"REDIS_HOST": "", "PATTERN": "", "REDIS_PORT": " "}, func(*Config) {}},
		{"host and port", map[string]string{"REDIS_HOST": "redis", "REDIS_PORT": "6380"}, func(c *Config) { c.Addr = "redis:6380" }},
		{"ipv6 host", map[string]string{"REDIS_HOST": "::1"}, func(c *Config) { c.Addr = "[::1]:6379" }},
		{"pattern pubsub", map[string]string{"PATTERN": "pubsub"}, func(c *Config) { c.Pattern = PatternPubSub }},
		{"pattern queue, spaces trimmed", map[string]string{"PATTERN": " queue "}, func(c *Config) { c.Pattern = PatternQueue }},
		{"port bounds", map[string]string{"REDIS_PORT": "65535"}, func(c *Config) { c.Addr = "localhost:65535" }},
		{"db", map[string]string{"REDIS_DB": "15"}, func(c *Config) { c.DB = 15 }},
		{"cluster", map[string]string{"REDIS_CLUSTER": "1"}, func(c *Config) { c.Cluster = true }},
		{"channel and queue names", map[string]string{"CHANNEL": "hello", "QUEUE": "hello_list"}, func(c *Config) {
			c.Channel, c.Queue = "hello", "hello_list"
		}},
		{"order watching", map[string]string{"ORDER_CHANNEL": "orders:events", "ORDER_QUEUE": "orders:display"}, func(c *Config) {
			c.OrderChannel, c.OrderQueue = "orders:events", "orders:display"
		}},
		{"json logs", map[string]string{"LOG_FORMAT": "json"}, func(c *Config) { c.LogFormat = "json" }},
		{"retries", map[string]string{"REDIS_CONNECT_ATTEMPTS": "2", "REDIS_CONNECT_RETRY_DELAY": "0.25"}, func(c *Config) {
			c.ConnectAttempts, c.ConnectRetryDelay = 2, 250*time.Millisecond
		}},
		{"url", map[string]string{"REDIS_URL": "redis://:secret@cache:6380/3"}, func(c *Config) { c.URL = "redis://:secret@cache:6380/3" }},
		{"otlp endpoint", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, func(c *Config) { c.OTLPEndpoint = "http://collector:4318" }},
		{"otlp endpoint https with path", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": " https://otel.example/prefix/ "}, func(c *Config) { c.OTLPEndpoint = "https://otel.example/prefix/" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := LoadConfig(envOf(tt.env))
			if err != nil {
				t.Fatalf("LoadConfig: %v", err)
			}
			want := DefaultConfig()
			tt.want(&want)
			if got != want {
				t.Errorf("got  %+v\nwant %+v", got, want)
			}
		})
	}
}

func TestDefaultConfigIsTheOriginal(t *testing.T) {
	c := DefaultConfig()
	if c.Addr != "localhost:6379" || c.Pattern != "both" || c.Channel != "messages" || c.Queue != "message_queue" ||
		c.ConnectAttempts != 5 || c.ConnectRetryDelay != 5*time.Second || c.PollTimeout != time.Second ||
		c.OrderChannel != "" || c.OrderQueue != "" || c.DB != 0 || c.OTLPEndpoint != "" {
		t.Errorf("DefaultConfig() = %+v", c)
	}
	opts := c.RedisOptions()
	if opts.Addr != "localhost:6379" || opts.DialTimeout != 5*time.Second ||
		opts.ReadTimeout != 3*time.Second || opts.WriteTimeout != 3*time.Second {
		t.Errorf("RedisOptions() = addr %s dial %s read %s write %s", opts.Addr, opts.DialTimeout, opts.ReadTimeout, opts.WriteTimeout)
	}
}

func TestRedisOptionsFromURL(t *testing.T) {
	c, err := LoadConfig(envOf(map[string]string{"REDIS_URL": "redis://:secret@cache:6380/3", "REDIS_HOST": "ignored"}))
	if err != nil {
		t.Fatal(err)
	}
	opts := c.RedisOptions()
	if opts.Addr != "cache:6380" || opts.DB != 3 || opts.Password != "secret" || opts.ReadTimeout != 3*time.Second {
		t.Errorf("RedisOptions() = addr %s db %d password %q read %s", opts.Addr, opts.DB, opts.Password, opts.ReadTimeout)
	}
}

func TestLoadConfigErrors(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		want string
	}{
		{"unknown pattern", map[string]string{"PATTERN": "x"}, `invalid PATTERN "x": must be pubsub, queue or both`},
		{"pattern is case sensitive", map[string]string{"PATTERN": "Both"}, `invalid PATTERN "Both": must be pubsub, queue or both`},
		{"port not a number", map[string]string{"REDIS_PORT": "abc"}, `invalid REDIS_PORT "abc": must be an integer`},
		{"port zero", map[string]string{"REDIS_PORT": "0"}, `invalid REDIS_PORT "0": must be between 1 and 65535`},
		{"port too big", map[string]string{"REDIS_PORT": "65536"}, `invalid REDIS_PORT "65536": must be between 1 and 65535`},
		{"port negative", map[string]string{"REDIS_PORT": "-1"}, `invalid REDIS_PORT "-1": must be between 1 and 65535`},
		{"port with host", map[string]string{"REDIS_PORT": "localhost:6379"}, `invalid REDIS_PORT "localhost:6379": must be an integer`},
		{"db", map[string]string{"REDIS_DB": "one"}, `invalid REDIS_DB "one": must be an integer`},
		{"cluster", map[string]string{"REDIS_CLUSTER": "yes"}, `invalid REDIS_CLUSTER "yes": must be 0 or 1`},
		{"log format", map[string]string{"LOG_FORMAT": "xml"}, `invalid LOG_FORMAT "xml": must be text or json`},
		{"attempts", map[string]string{"REDIS_CONNECT_ATTEMPTS": "0"}, `invalid REDIS_CONNECT_ATTEMPTS "0": must be between 1 and 1000`},
		{"delay", map[string]string{"REDIS_CONNECT_RETRY_DELAY": "NaN"}, `invalid REDIS_CONNECT_RETRY_DELAY "NaN": must be between 0 and 3600`},
		{"url scheme, password hidden", map[string]string{"REDIS_URL": "http://u:pw@host"}, `invalid REDIS_URL "http://u:xxxxx@host": must be redis://, rediss:// or unix:// URL`},
		{"url port past 65535", map[string]string{"REDIS_URL": "redis://u:pw@host:99999/0"}, `invalid REDIS_URL "redis://u:xxxxx@host:99999/0": the port must be 1 to 65535`},
		{"url port 0", map[string]string{"REDIS_URL": "redis://host:0/0"}, `invalid REDIS_URL "redis://host:0/0": the port must be 1 to 65535`},
		{"tls verification off", map[string]string{"REDIS_URL": "rediss://u:pw@host?skip_verify=true"}, `invalid REDIS_URL "rediss://u:xxxxx@host?skip_verify=true": TLS verification cannot be turned off (skip_verify)`},
		{"ca file without tls", map[string]string{"REDIS_URL": "redis://host", "REDIS_TLS_CA_FILE": "ca.pem"}, `invalid REDIS_TLS_CA_FILE "ca.pem": needs a rediss:// REDIS_URL`},
		{"ca file missing", map[string]string{"REDIS_URL": "rediss://host", "REDIS_TLS_CA_FILE": "/nonexistent/ca.pem"}, `invalid REDIS_TLS_CA_FILE "/nonexistent/ca.pem": no such file`},
		{"otlp endpoint without scheme", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, `invalid OTEL_EXPORTER_OTLP_ENDPOINT "collector:4318": must be an http:// or https:// URL, e.g. http://localhost:4318`},
		{"otlp endpoint grpc scheme, user hidden", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://tok:en@collector:4317"}, `invalid OTEL_EXPORTER_OTLP_ENDPOINT "grpc://xxxxx@collector:4317": must be an http:// or https:// URL, e.g. http://localhost:4318`},
		{"ca file not pem", map[string]string{"REDIS_URL": "rediss://host", "REDIS_TLS_CA_FILE": "config_test.go"}, `invalid REDIS_TLS_CA_FILE "config_test.go": no PEM certificate in it`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := LoadConfig(envOf(tt.env))
			var cerr *ConfigError
			if !errors.As(err, &cerr) {
				t.Fatalf("LoadConfig error = %v, want a *ConfigError", err)
			}
			if err.Error() != tt.want {
				t.Errorf("error\n got %s\nwant %s", err, tt.want)
			}
		})
	}
}
