package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

const contractsDir = "../contracts"

// expectedDisplay is the exact line the subscriber prints for each golden example,
// received first on pub/sub. A new example must be added here (the test says so).
var expectedDisplay = map[string]string{
	"hello.json":        "[2026-11-28 10:15:02] [python-publisher] Hello from Python #7 (ID: 7d1c1c1e-8a3f-4a57-9d38-1b5b0e0f4c2a) [Received #1 from pub-sub]\n",
	"order_placed.json": "[2026-11-28 10:15:04] [orders-api] Order 42 placed by ada@example.com: 2 items, 25.00 EUR (ID: 3f0e2b8c-5d1a-4c9e-8f7b-2a6d9c4e1b70) [Received #1 from pub-sub]\n",
}

func compileEnvelopeSchema(t *testing.T) *jsonschema.Schema {
	t.Helper()
	path, err := filepath.Abs(filepath.Join(contractsDir, "envelope.schema.json"))
	if err != nil {
		t.Fatal(err)
	}
	schema, err := jsonschema.NewCompiler().Compile(path)
	if err != nil {
		t.Fatalf("compile %s: %v", path, err)
	}
	return schema
}

func readInstance(t *testing.T, path string) any {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	inst, err := jsonschema.UnmarshalJSON(f)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return inst
}

func globExamples(t *testing.T, pattern string) []string {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(contractsDir, pattern))
	if err != nil {
		t.Fatal(err)
	}
	if len(paths) == 0 {
		t.Fatalf("no files match %s in %s", pattern, contractsDir)
	}
	return paths
}

func TestContractExamplesValidate(t *testing.T) {
	schema := compileEnvelopeSchema(t)
	for _, path := range globExamples(t, "examples/*.json") {
		t.Run(filepath.Base(path), func(t *testing.T) {
			if err := schema.Validate(readInstance(t, path)); err != nil {
				t.Errorf("golden example does not validate: %v", err)
			}
		})
	}
}

func TestContractInvalidExamplesFail(t *testing.T) {
	schema := compileEnvelopeSchema(t)
	for _, path := range globExamples(t, "examples/invalid/*.json") {
		t.Run(filepath.Base(path), func(t *testing.T) {
			if err := schema.Validate(readInstance(t, path)); err == nil {
				t.Error("invalid example validates against the schema")
			}
		})
	}
}

// Each golden example, received on pub/sub as the first message, prints exactly
// the expected line through the subscriber's own handler.
func TestContractExamplesDisplay(t *testing.T) {
	seen := map[string]bool{}
	for _, path := range globExamples(t, "examples/*.json") {
		name := filepath.Base(path)
		seen[name] = true
		t.Run(name, func(t *testing.T) {
			want, ok := expectedDisplay[name]
			if !ok {
				t.Fatalf("no expected display line for %s: add one to expectedDisplay", name)
			}
			payload, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			out, logs := &syncBuffer{}, &syncBuffer{}
			s := NewSubscriber(DefaultConfig(), out, NewLogger("text", logs))
			t.Cleanup(func() { _ = s.client.Close() })
			s.now = func() time.Time { return time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC) } // must not show
			s.handle(string(payload), SourcePubSub)
			if got := out.String(); got != want {
				t.Errorf("display\n got %q\nwant %q", got, want)
			}
			if logs.String() != "" {
				t.Errorf("unexpected log lines: %s", logs)
			}
		})
	}
	for name := range expectedDisplay {
		if !seen[name] {
			t.Errorf("expectedDisplay names %s, which is not in %s/examples", name, contractsDir)
		}
	}
}
