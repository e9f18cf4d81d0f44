package main

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Exit codes, the same as the Python processes' (orders/config.py).
const (
	// ExitOK is a normal stop (signal received, or stopped before connecting).
	ExitOK = 0
	// ExitNoRedis means Redis could not be reached after every connection attempt.
	ExitNoRedis = 1
	// ExitBadConfig means an environment variable has an invalid value.
	ExitBadConfig = 2
)

// Patterns accepted by PATTERN.
const (
	// PatternPubSub listens on the Hello pub/sub channel only.
	PatternPubSub = "pubsub"
	// PatternQueue pops the Hello list only.
	PatternQueue = "queue"
	// PatternBoth does both, as the original did by default.
	PatternBoth = "both"
)

// Defaults of every setting. The Hello names match orders/keys.py.
const (
	// DefaultRedisHost is REDIS_HOST's default.
	DefaultRedisHost = "localhost"
	// DefaultRedisPort is REDIS_PORT's default.
	DefaultRedisPort = "6379"
	// DefaultPattern is PATTERN's default.
	DefaultPattern = PatternBoth
	// DefaultChannel is the original Hello pub/sub channel (CHANNEL).
	DefaultChannel = "messages"
	// DefaultQueue is the original Hello list (QUEUE).
	DefaultQueue = "message_queue"
	// DefaultConnectAttempts is how many PINGs are tried at start (REDIS_CONNECT_ATTEMPTS).
	DefaultConnectAttempts = 5
	// DefaultConnectRetryDelay is the wait between two attempts (REDIS_CONNECT_RETRY_DELAY).
	DefaultConnectRetryDelay = 5 * time.Second
	// DefaultPollTimeout is the BLPOP timeout: the longest a queue listener takes to
	// notice a shutdown.
	DefaultPollTimeout = 1 * time.Second
	// DefaultErrorBackoff is the pause after a failed BLPOP (e.g. Redis restarting).
	DefaultErrorBackoff = 1 * time.Second
	// DialTimeout, ReadTimeout and WriteTimeout are the original client's timeouts.
	DialTimeout = 5 * time.Second
	// ReadTimeout is the socket read timeout (BLPOP adds its own timeout on top).
	ReadTimeout = 3 * time.Second
	// WriteTimeout is the socket write timeout.
	WriteTimeout = 3 * time.Second
)

// Config is the subscriber's whole configuration, read once at start.
type Config struct {
	// Addr is host:port of the Redis server (REDIS_HOST, REDIS_PORT).
	Addr string
	// DB is the Redis database number (REDIS_DB).
	DB int
	// URL, when set, replaces Addr and DB (REDIS_URL: redis://, rediss:// or unix://).
	URL string
	// TLSCAFile is a PEM file of CA certificates that verify a rediss:// server
	// (REDIS_TLS_CA_FILE); empty means the system's CAs. Verification is always on.
	TLSCAFile string
	// rootCAs is TLSCAFile's certificates, read once in LoadConfig.
	rootCAs *x509.CertPool
	// Cluster means Redis Cluster (REDIS_CLUSTER=1): Addr or URL is one seed node.
	Cluster bool
	// Pattern is pubsub, queue or both (PATTERN).
	Pattern string
	// Channel is the Hello pub/sub channel (CHANNEL).
	Channel string
	// Queue is the Hello list (QUEUE).
	Queue string
	// OrderChannel, when set, is an extra pub/sub channel to display (ORDER_CHANNEL).
	OrderChannel string
	// OrderQueue, when set, is an extra list to pop and display (ORDER_QUEUE).
	OrderQueue string
	// LogFormat is "text" (the original's lines) or "json" (LOG_FORMAT).
	LogFormat string
	// OTLPEndpoint, when set, is the OTLP/HTTP base URL spans are exported to
	// (OTEL_EXPORTER_OTLP_ENDPOINT; traces go to <base>/v1/traces). Empty: no tracing.
	OTLPEndpoint string
	// ConnectAttempts is the number of PINGs tried before giving up.
	ConnectAttempts int
	// ConnectRetryDelay is the wait between two connection attempts.
	ConnectRetryDelay time.Duration
	// PollTimeout is the BLPOP timeout.
	PollTimeout time.Duration
	// ErrorBackoff is the pause after a BLPOP error.
	ErrorBackoff time.Duration
}

// DefaultConfig is the configuration with no environment variable set.
func DefaultConfig() Config {
	return Config{
		Addr:              net.JoinHostPort(DefaultRedisHost, DefaultRedisPort),
		Pattern:           DefaultPattern,
		Channel:           DefaultChannel,
		Queue:             DefaultQueue,
		LogFormat:         "text",
		ConnectAttempts:   DefaultConnectAttempts,
		ConnectRetryDelay: DefaultConnectRetryDelay,
		PollTimeout:       DefaultPollTimeout,
		ErrorBackoff:      DefaultErrorBackoff,
	}
}

// ConfigError is an invalid environment variable. Its message is one line.
type ConfigError struct {
	Name, Value, Reason string
}

func (e *ConfigError) Error() string {
	return fmt.Sprintf("invalid %s %q: %s", e.Name, e.Value, e.Reason)
}

// LoadConfig reads the configuration through getenv (os.Getenv in main). As in the
// original, an empty variable means its default. Values are trimmed of spaces.
func LoadConfig(getenv func(string) string) (Config, error) {
	cfg := DefaultConfig()
	get := func(name, def string) string {
		if v := strings.TrimSpace(getenv(name)); v != "" {
			return v
		}
		return def
	}

	cfg.Pattern = get("PATTERN", DefaultPattern)
	switch cfg.Pattern {
	case PatternPubSub, PatternQueue, PatternBoth:
	default:
		return Config{}, &ConfigError{"PATTERN", cfg.Pattern, "must be pubsub, queue or both"}
	}

	host := get("REDIS_HOST", DefaultRedisHost)
	port, err := intVar(get, "REDIS_PORT", DefaultRedisPort, 1, 65535)
	if err != nil {
		return Config{}, err
	}
	cfg.Addr = net.JoinHostPort(host, strconv.Itoa(port))
	if cfg.DB, err = intVar(get, "REDIS_DB", "0", 0, 1<<20); err != nil {
		return Config{}, err
	}
	if cfg.URL = get("REDIS_URL", ""); cfg.URL != "" {
		parsed, err := redis.ParseURL(cfg.URL)
		if err != nil {
			// Not the parser's message: it may echo the URL's password.
			return Config{}, &ConfigError{"REDIS_URL", redactURL(cfg.URL), "must be redis://, rediss:// or unix:// URL"}
		}
		if parsed.Network == "tcp" && !validPort(parsed.Addr) {
			// go-redis takes any number; the dial would fail at every attempt instead.
			return Config{}, &ConfigError{"REDIS_URL", redactURL(cfg.URL), "the port must be 1 to 65535"}
		}
		if parsed.TLSConfig != nil && parsed.TLSConfig.InsecureSkipVerify {
			return Config{}, &ConfigError{"REDIS_URL", redactURL(cfg.URL), "TLS verification cannot be turned off (skip_verify)"}
		}
	}

	if cfg.TLSCAFile = get("REDIS_TLS_CA_FILE", ""); cfg.TLSCAFile != "" {
		if !strings.HasPrefix(cfg.URL, "rediss://") {
			// Never a silent plain-text connection to a server meant to be verified.
			return Config{}, &ConfigError{"REDIS_TLS_CA_FILE", cfg.TLSCAFile, "needs a rediss:// REDIS_URL"}
		}
		if cfg.rootCAs, err = loadCAs(cfg.TLSCAFile); err != nil {
			return Config{}, err
		}
	}

	switch cluster := get("REDIS_CLUSTER", "0"); cluster {
	case "0", "1":
		cfg.Cluster = cluster == "1"
	default:
		return Config{}, &ConfigError{"REDIS_CLUSTER", cluster, "must be 0 or 1"}
	}

	cfg.Channel = get("CHANNEL", DefaultChannel)
	cfg.Queue = get("QUEUE", DefaultQueue)
	cfg.OrderChannel = get("ORDER_CHANNEL", "")
	cfg.OrderQueue = get("ORDER_QUEUE", "")

	if cfg.OTLPEndpoint = get("OTEL_EXPORTER_OTLP_ENDPOINT", ""); cfg.OTLPEndpoint != "" {
		u, err := url.Parse(cfg.OTLPEndpoint)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			// Not the parser's message, and not the value's user info: it may hold a token.
			return Config{}, &ConfigError{"OTEL_EXPORTER_OTLP_ENDPOINT", redactEndpoint(cfg.OTLPEndpoint), "must be an http:// or https:// URL, e.g. http://localhost:4318"}
		}
	}

	cfg.LogFormat = get("LOG_FORMAT", "text")
	if cfg.LogFormat != "text" && cfg.LogFormat != "json" {
		return Config{}, &ConfigError{"LOG_FORMAT", cfg.LogFormat, "must be text or json"}
	}
	if cfg.ConnectAttempts, err = intVar(get, "REDIS_CONNECT_ATTEMPTS", strconv.Itoa(DefaultConnectAttempts), 1, 1000); err != nil {
		return Config{}, err
	}
	if cfg.ConnectRetryDelay, err = secondsVar(get, "REDIS_CONNECT_RETRY_DELAY", DefaultConnectRetryDelay, 3600); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

func intVar(get func(string, string) string, name, def string, low, high int) (int, error) {
	raw := get(name, def)
	v, err := strconv.Atoi(raw)
	if err != nil {
		return 0, &ConfigError{name, raw, "must be an integer"}
	}
	if v < low || v > high {
		return 0, &ConfigError{name, raw, fmt.Sprintf("must be between %d and %d", low, high)}
	}
	return v, nil
}

func secondsVar(get func(string, string) string, name string, def time.Duration, maxSeconds float64) (time.Duration, error) {
	raw := get(name, "")
	if raw == "" {
		return def, nil
	}
	v, err := strconv.ParseFloat(raw, 64)
	if err != nil {
		return 0, &ConfigError{name, raw, "must be a number of seconds"}
	}
	if !(v >= 0 && v <= maxSeconds) { // also rejects NaN
		return 0, &ConfigError{name, raw, fmt.Sprintf("must be between 0 and %g", maxSeconds)}
	}
	return time.Duration(v * float64(time.Second)), nil
}

// loadCAs reads a PEM file of CA certificates (REDIS_TLS_CA_FILE).
func loadCAs(path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, &ConfigError{"REDIS_TLS_CA_FILE", path, "no such file"}
	}
	if err != nil {
		return nil, &ConfigError{"REDIS_TLS_CA_FILE", path, "cannot be read"}
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, &ConfigError{"REDIS_TLS_CA_FILE", path, "no PEM certificate in it"}
	}
	return pool, nil
}

// redactEndpoint keeps only the scheme and host of an unusable OTLP endpoint.
func redactEndpoint(raw string) string {
	if u, err := url.Parse(raw); err == nil && u.User != nil {
		u.User = url.User("xxxxx")
		return u.String()
	}
	return raw
}

// redactURL hides the password of a Redis URL for error and log lines.
func redactURL(raw string) string {
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok {
		return raw
	}
	userinfo, host, ok := strings.Cut(rest, "@")
	if !ok {
		return raw
	}
	if user, _, hasPass := strings.Cut(userinfo, ":"); hasPass {
		return scheme + "://" + user + ":xxxxx@" + host
	}
	return raw
}

// RedisOptions are the go-redis client options: the original's timeouts, and the
// address and database from Addr/DB or from URL.
func (c Config) RedisOptions() *redis.Options {
	opts := &redis.Options{Addr: c.Addr, DB: c.DB}
	if c.URL != "" {
		if parsed, err := redis.ParseURL(c.URL); err == nil { // validated in LoadConfig
			opts = parsed
		}
	}
	if opts.TLSConfig != nil && c.rootCAs != nil {
		// rediss://: ParseURL's config verifies the server's name; the chain is
		// verified against REDIS_TLS_CA_FILE instead of the system's CAs.
		opts.TLSConfig.RootCAs = c.rootCAs
	}
	opts.DialTimeout = DialTimeout
	opts.ReadTimeout = ReadTimeout
	opts.WriteTimeout = WriteTimeout
	// One dial per try: the retries that matter are ours (ConnectAttempts at start,
	// ErrorBackoff in the BLPOP loop); go-redis's own dial retries (5 by default
	// since v9.12) would make one failed attempt take seconds against a closed port.
	opts.DialerRetries = 1
	return opts
}

// NewClient builds the Redis client: a single-node client, or with Cluster a cluster
// client seeded by the one configured node (it discovers the others). Both carry the
// options of RedisOptions (timeouts, credentials, TLS); a cluster has no databases.
// Classic pub/sub works on a cluster (PUBLISH reaches every node), and the Hello list
// is a single key, so BLPOP needs no hash tag.
func (c Config) NewClient() redis.UniversalClient {
	opts := c.RedisOptions()
	if !c.Cluster {
		return redis.NewClient(opts)
	}
	return redis.NewClusterClient(&redis.ClusterOptions{
		Addrs:         []string{opts.Addr},
		Username:      opts.Username,
		Password:      opts.Password,
		TLSConfig:     opts.TLSConfig,
		DialTimeout:   opts.DialTimeout,
		ReadTimeout:   opts.ReadTimeout,
		WriteTimeout:  opts.WriteTimeout,
		DialerRetries: opts.DialerRetries,
	})
}

// validPort reports whether addr (host:port) names a TCP port from 1 to 65535.
func validPort(addr string) bool {
	_, raw, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	port, err := strconv.Atoi(raw)
	return err == nil && port >= 1 && port <= 65535
}
