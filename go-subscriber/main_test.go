package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestRunBadConfigExits2(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		want string
	}{
		{"pattern", map[string]string{"PATTERN": "x"}, `go-subscriber: invalid PATTERN "x": must be pubsub, queue or both` + "\n"},
		{"port", map[string]string{"REDIS_PORT": "redis"}, `go-subscriber: invalid REDIS_PORT "redis": must be an integer` + "\n"},
		{"port range", map[string]string{"REDIS_PORT": "99999"}, `go-subscriber: invalid REDIS_PORT "99999": must be between 1 and 65535` + "\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if code := run(context.Background(), envOf(tt.env), &stdout, &stderr); code != ExitBadConfig {
				t.Errorf("exit code %d, want %d", code, ExitBadConfig)
			}
			if stderr.String() != tt.want || stdout.Len() != 0 {
				t.Errorf("stderr %q stdout %q; want stderr %q", stderr.String(), stdout.String(), tt.want)
			}
		})
	}
}

func TestRunNoRedisExits1(t *testing.T) {
	_, port, _ := strings.Cut(closedPort(t), ":")
	env := map[string]string{
		"REDIS_HOST": "127.0.0.1", "REDIS_PORT": port,
		"REDIS_CONNECT_ATTEMPTS": "2", "REDIS_CONNECT_RETRY_DELAY": "0.05",
	}
	stdout, stderr := &syncBuffer{}, &syncBuffer{}
	if code := run(context.Background(), envOf(env), stdout, stderr); code != ExitNoRedis {
		t.Errorf("exit code %d, want %d", code, ExitNoRedis)
	}
	if stderr.String() != "" {
		t.Errorf("stderr %q: logs must go to stdout", stderr)
	}
	lines := stdout.lines()
	if len(lines) == 0 || !strings.HasSuffix(lines[len(lines)-1], " Subscriber failed: failed to connect after 2 attempts") {
		t.Errorf("stdout:\n%s", stdout)
	}
	checkLogOrder(t, stdout, "Starting Go Subscriber...", "Pattern: both")
}

func TestRunStopsCleanlyExits0(t *testing.T) {
	addr, db := redisTestEnv(t)
	host, port, _ := strings.Cut(addr, ":")
	env := map[string]string{"REDIS_HOST": host, "REDIS_PORT": port, "REDIS_DB": strconv.Itoa(db), "LOG_FORMAT": "json"}
	stdout, stderr := &syncBuffer{}, &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() { done <- run(ctx, envOf(env), stdout, stderr) }()
	waitFor(t, 5*time.Second, "the queue listener", func() bool {
		return strings.Contains(stdout.String(), `"msg":"Starting queue subscriber on list 'message_queue'"`)
	})
	cancel()
	select {
	case code := <-done:
		if code != ExitOK {
			t.Errorf("exit code %d, want 0", code)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("run did not return")
	}
	if !strings.Contains(stdout.String(), `"msg":"Subscriber stopped. Total messages received: 0"`) || stderr.String() != "" {
		t.Errorf("stdout:\n%s\nstderr:\n%s", stdout, stderr)
	}
}

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// buildBinary builds go-subscriber once per test run, as `go build` would.
func buildBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		goTool, err := exec.LookPath("go")
		if err != nil {
			buildErr = err
			return
		}
		dir, err := os.MkdirTemp("", "go-subscriber-test")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "go-subscriber")
		out, err := exec.Command(goTool, "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = errors.New(string(out))
		}
	})
	if buildErr != nil {
		t.Fatalf("go build: %v", buildErr)
	}
	return binPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		_ = os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// binaryEnv is a clean environment: `make test` exports PATTERN and REDIS_PORT.
func binaryEnv(vars ...string) []string {
	return append([]string{"PATH=" + os.Getenv("PATH")}, vars...)
}

func TestBinaryBadPattern(t *testing.T) {
	cmd := exec.Command(buildBinary(t))
	cmd.Env = binaryEnv("PATTERN=sideways")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != ExitBadConfig {
		t.Fatalf("exit: %v, want code 2", err)
	}
	if got, want := stderr.String(), "go-subscriber: invalid PATTERN \"sideways\": must be pubsub, queue or both\n"; got != want {
		t.Errorf("stderr %q, want %q", got, want)
	}
}

// The real process: logs and display lines on stdout, SIGTERM stops it promptly with
// exit code 0 and the final line.
func TestBinarySIGTERM(t *testing.T) {
	cfg, client := setupRedis(t)
	host, port, _ := strings.Cut(cfg.Addr, ":")
	channel := uniqueName(t, "messages")
	cmd := exec.Command(buildBinary(t))
	cmd.Env = binaryEnv("REDIS_HOST="+host, "REDIS_PORT="+port, "REDIS_DB="+strconv.Itoa(cfg.DB), "CHANNEL="+channel)
	stdout, stderr := &syncBuffer{}, &syncBuffer{}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	waitSubscribed(t, client, channel)
	client.Publish(context.Background(), channel, hello(1, "2026-11-28T10:15:01Z"))
	want := "[2026-11-28 10:15:01] [python-publisher] Hello from Python #1 (ID: id-1) [Received #1 from pub-sub]\n"
	waitFor(t, 5*time.Second, "the display line", func() bool { return strings.Contains(stdout.String(), want) })

	start := time.Now()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit: %v\nstdout:\n%s\nstderr:\n%s", err, stdout, stderr)
	}
	if took := time.Since(start); took > 1500*time.Millisecond {
		t.Errorf("SIGTERM to exit took %s, want <= 1.5s", took)
	}
	if stderr.String() != "" {
		t.Errorf("stderr %q: everything must go to stdout", stderr)
	}
	lines := stdout.lines()
	if last := lines[len(lines)-1]; !textLine.MatchString(last) || !strings.HasSuffix(last, "] Subscriber stopped. Total messages received: 1") {
		t.Errorf("last line %q", last)
	}
	checkLogOrder(t, stdout,
		"Starting Go Subscriber...",
		"Pattern: both",
		"Starting queue subscriber on list 'message_queue'",
		"Received shutdown signal. Shutting down gracefully...",
		"Queue subscriber shutting down",
		"Subscriber stopped. Total messages received: 1",
	)
}
