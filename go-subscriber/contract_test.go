package main

// The message contract, read from ../contracts (the same files pytest reads):
// every golden example validates and is displayed with its own line; every invalid
// example fails for exactly the one rule its file name says (the naming is described
// in tests/contract/invalid_examples.py), and validates once that rule is deleted.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"github.com/santhosh-tekuri/jsonschema/v6/kind"
)

const contractsDir = "../contracts"

// expectedDisplay is the exact line the subscriber prints for each golden example,
// received first on pub/sub. A new example must be added here (the test says so).
var expectedDisplay = map[string]string{
	"hello.json":                "[2026-11-28 10:15:02] [python-publisher] Hello from Python #7 (ID: 7d1c1c1e-8a3f-4a57-9d38-1b5b0e0f4c2a) [Received #1 from pub-sub]\n",
	"order_placed.json":         "[2026-11-28 10:15:04] [orders-api] Order 42 placed by ada@example.com: 2 items, 25.00 EUR (ID: 3f0e2b8c-5d1a-4c9e-8f7b-2a6d9c4e1b70) [Received #1 from pub-sub]\n",
	"order_placed_express.json": "[2026-11-28 10:16:00] [orders-api] Order 43 placed by grace@example.com: 3 items, 99.00 EUR, express (ID: 9b2d7c41-0e6f-4a8b-b3c5-7d18e2f4a690, trace: 4bf92f3577b34da6a3ce929d0e0e4736) [Received #1 from pub-sub]\n",
	"payment_captured.json":     "[2026-11-28 10:16:00] [payment-service] Payment captured for order #43: 99.00 EUR, payment pay_9b2d7c410e6f (ID: c5a1e0d2-3b4f-4e67-8a9b-0c1d2e3f4a5b, trace: 4bf92f3577b34da6a3ce929d0e0e4736) [Received #1 from pub-sub]\n",
	"payment_declined.json":     "[2026-11-28 10:17:30] [payment-service] Payment declined for order #44: card declined, 18.00 USD (ID: d7e8f9a0-1b2c-4d3e-9f40-5a6b7c8d9e0f, trace: 0af7651916cd43dd8448eb211c80319c) [Received #1 from pub-sub]\n",
	"invoice_issued.json":       "[2026-11-28 10:16:00] [invoice-service] Invoice INV-2026-000043 issued for order #43: 99.00 EUR (ID: e1f2a3b4-c5d6-4e7f-8091-a2b3c4d5e6f7, trace: 4bf92f3577b34da6a3ce929d0e0e4736) [Received #1 from pub-sub]\n",
	"shipment_booked.json":      "[2026-11-28 10:16:01] [shipping-service] Shipment booked for order #43: DHL, tracking JD014600006281230043, shipment SHP-000043 (ID: f0e1d2c3-b4a5-4968-8776-5a4b3c2d1e0f, trace: 4bf92f3577b34da6a3ce929d0e0e4736) [Received #1 from pub-sub]\n",
	"customer_notified.json":    "[2026-11-28 10:16:01] [email-service] Customer notified for order #43: shipped, Message-ID <order-43-shipped@orders.example> (ID: 0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d, trace: 4bf92f3577b34da6a3ce929d0e0e4736) [Received #1 from pub-sub]\n",
}

// expectedData is what each golden example's data parses to, by type.
var expectedData = map[string]any{
	"order_placed.json": OrderPlacedV1{OrderID: 42, CustomerEmail: "ada@example.com", Currency: "EUR", Total: "25.00",
		Lines: []OrderLine{{SKU: "BOOK-1", Quantity: 2, UnitPrice: "12.50", LineTotal: "25.00"}}},
	"order_placed_express.json": OrderPlacedV1{OrderID: 43, CustomerEmail: "grace@example.com", Currency: "EUR", Total: "99.00", Priority: "express",
		Lines: []OrderLine{{SKU: "BOOK-1", Quantity: 2, UnitPrice: "12.50", LineTotal: "25.00"}, {SKU: "LAMP-7", Quantity: 1, UnitPrice: "74.00", LineTotal: "74.00"}}},
	"payment_captured.json":  PaymentCapturedV1{OrderID: 43, PaymentID: "pay_9b2d7c410e6f", Amount: "99.00", Currency: "EUR"},
	"payment_declined.json":  PaymentDeclinedV1{OrderID: 44, Reason: "card declined", Amount: "18.00", Currency: "USD"},
	"invoice_issued.json":    InvoiceIssuedV1{OrderID: 43, InvoiceNumber: "INV-2026-000043", Total: "99.00", Currency: "EUR"},
	"shipment_booked.json":   ShipmentBookedV1{OrderID: 43, ShipmentID: "SHP-000043", Carrier: "DHL", TrackingNumber: "JD014600006281230043"},
	"customer_notified.json": CustomerNotifiedV1{OrderID: 43, Step: "shipped", MessageID: "<order-43-shipped@orders.example>"},
}

func schemaPath(t *testing.T) string {
	t.Helper()
	path, err := filepath.Abs(filepath.Join(contractsDir, "envelope.schema.json"))
	if err != nil {
		t.Fatal(err)
	}
	return path
}

func compileEnvelopeSchema(t *testing.T) *jsonschema.Schema {
	t.Helper()
	schema, err := jsonschema.NewCompiler().Compile(schemaPath(t))
	if err != nil {
		t.Fatalf("compile: %v", err)
	}
	return schema
}

// schemaDoc is the schema as a JSON document (maps and slices), to read or mutate.
func schemaDoc(t *testing.T) map[string]any {
	t.Helper()
	f, err := os.Open(schemaPath(t))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	doc, err := jsonschema.UnmarshalJSON(f)
	if err != nil {
		t.Fatal(err)
	}
	return doc.(map[string]any)
}

// compileDoc compiles a schema document held in memory.
func compileDoc(t *testing.T, doc map[string]any) *jsonschema.Schema {
	t.Helper()
	c := jsonschema.NewCompiler()
	if err := c.AddResource("mem:///envelope.schema.json", doc); err != nil {
		t.Fatal(err)
	}
	schema, err := c.Compile("mem:///envelope.schema.json")
	if err != nil {
		t.Fatalf("compile: %v", err)
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

// ruleArity is the keywords an invalid example's name can end with, and how many
// arguments follow each; "ref" is a property's $ref to a shared definition.
var ruleArity = map[string]int{
	"type": 0, "enum": 0, "const": 0, "pattern": 0, "minLength": 0, "minimum": 0, "minItems": 0,
	"additionalProperties": 0, "required": 1, "dependentRequired": 2, "ref": 0,
}

// schemaRule is one rule of the schema: a keyword in the object at parent.
type schemaRule struct {
	parent  []string
	keyword string
	args    []string
}

// location is the rule's keyword location: its JSON pointer.
func (r schemaRule) location() string {
	return "/" + strings.Join(append(slices.Clone(r.parent), r.keyword), "/")
}

// ruleOf is the rule an invalid example's name (file name without .json) names:
// segments joined by ".", without the words "properties" and "$defs", then the
// keyword and its arguments; anything after "--" only tells examples apart.
func ruleOf(name string, doc map[string]any) (schemaRule, error) {
	name, _, _ = strings.Cut(name, "--")
	parts := strings.Split(name, ".")
	node, parent := doc, []string{}
	for i, part := range parts {
		keyword := part
		if part == "ref" {
			keyword = "$ref"
		}
		if arity, ok := ruleArity[part]; ok && arity == len(parts)-i-1 {
			if _, has := node[keyword]; has {
				return schemaRule{parent: parent, keyword: keyword, args: parts[i+1:]}, nil
			}
		}
		props, _ := node["properties"].(map[string]any)
		defs, _ := doc["$defs"].(map[string]any)
		items, _ := node["items"].(map[string]any)
		switch {
		case props[part] != nil:
			node, parent = props[part].(map[string]any), append(parent, "properties", part)
		case len(parent) == 0 && defs[part] != nil:
			node, parent = defs[part].(map[string]any), append(parent, "$defs", part)
		case part == "items" && items != nil:
			node, parent = items, append(parent, "items")
		default:
			return schemaRule{}, fmt.Errorf("%s: no %q under /%s", name, part, strings.Join(parent, "/"))
		}
	}
	return schemaRule{}, fmt.Errorf("%s: does not end with a keyword", name)
}

// errorStep is one step of a validation error's chain: the keyword location and kind.
type errorStep struct {
	location string
	kind     jsonschema.ErrorKind
}

// errorChains is the chain from the root error to each leaf (one chain per failed rule).
func errorChains(err *jsonschema.ValidationError, above []errorStep) [][]errorStep {
	chain := above
	if path := err.ErrorKind.KeywordPath(); len(path) > 0 {
		_, fragment, _ := strings.Cut(err.SchemaURL, "#")
		chain = append(slices.Clone(above), errorStep{fragment + "/" + strings.Join(path, "/"), err.ErrorKind})
	}
	if len(err.Causes) == 0 {
		return [][]errorStep{chain}
	}
	var out [][]errorStep
	for _, cause := range err.Causes {
		out = append(out, errorChains(cause, chain)...)
	}
	return out
}

// failsFor reports whether the chain of a (single) failure is exactly rule: the leaf
// is the rule's keyword with its arguments, or for a $ref rule the $ref is on the way.
func failsFor(chain []errorStep, rule schemaRule) bool {
	if len(chain) == 0 {
		return false
	}
	if rule.keyword == "$ref" {
		return slices.ContainsFunc(chain, func(s errorStep) bool { return s.location == rule.location() })
	}
	leaf := chain[len(chain)-1]
	switch k := leaf.kind.(type) {
	case *kind.Required:
		return leaf.location == rule.location() && slices.Equal(k.Missing, rule.args)
	case *kind.DependentRequired:
		return leaf.location == rule.location()+"/"+k.Prop && slices.Equal([]string{k.Prop, k.Missing[0]}, rule.args) && len(k.Missing) == 1
	}
	return leaf.location == rule.location()
}

// deleteRule removes rule from a schema document.
func deleteRule(t *testing.T, doc map[string]any, rule schemaRule) {
	t.Helper()
	node := doc
	for _, key := range rule.parent {
		node = node[key].(map[string]any)
	}
	without := func(list []any, value string) []any {
		return slices.DeleteFunc(slices.Clone(list), func(v any) bool { return v == value })
	}
	switch rule.keyword {
	case "required":
		node["required"] = without(node["required"].([]any), rule.args[0])
	case "dependentRequired":
		deps := node["dependentRequired"].(map[string]any)
		deps[rule.args[0]] = without(deps[rule.args[0]].([]any), rule.args[1])
	default:
		delete(node, rule.keyword)
	}
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

// Each invalid example breaks exactly the rule its name says, and only that one:
// with that rule deleted from the schema, the example validates.
func TestContractInvalidExampleFailsForExactlyItsRule(t *testing.T) {
	schema := compileEnvelopeSchema(t)
	paths := globExamples(t, "examples/invalid/*.json")
	if len(paths) < 100 {
		t.Fatalf("only %d invalid examples", len(paths))
	}
	for _, path := range paths {
		name := strings.TrimSuffix(filepath.Base(path), ".json")
		t.Run(name, func(t *testing.T) {
			doc := schemaDoc(t)
			rule, err := ruleOf(name, doc)
			if err != nil {
				t.Fatal(err)
			}
			inst := readInstance(t, path)
			err = schema.Validate(inst)
			var verr *jsonschema.ValidationError
			if !errors.As(err, &verr) {
				t.Fatalf("validates (error %v), want it to fail for %s %v", err, rule.location(), rule.args)
			}
			chains := errorChains(verr, nil)
			if len(chains) != 1 || !failsFor(chains[0], rule) {
				t.Fatalf("fails for %d rule(s), want only %s %v:\n%v", len(chains), rule.location(), rule.args, verr)
			}
			deleteRule(t, doc, rule)
			if err := compileDoc(t, doc).Validate(inst); err != nil {
				t.Errorf("still invalid with %s %v deleted from the schema: %v", rule.location(), rule.args, err)
			}
		})
	}
}

// Every pattern of the schema is anchored and has an example that is a valid value
// plus "\n": Go's regexp, like ECMA-262, reads $ as the end of the text (\z), so the
// trailing newline fails (the test above checks that it fails for that pattern).
func TestContractPatternsAreFullMatch(t *testing.T) {
	doc := schemaDoc(t)
	patterns := map[string]bool{}
	var walk func(node any, path []string)
	walk = func(node any, path []string) {
		switch n := node.(type) {
		case map[string]any:
			for key, value := range n {
				if s, ok := value.(string); ok && key == "pattern" {
					if !strings.HasPrefix(s, "^") || !strings.HasSuffix(s, "$") {
						t.Errorf("pattern %q at /%s is not anchored ^...$", s, strings.Join(path, "/"))
					}
					patterns["/"+strings.Join(append(slices.Clone(path), key), "/")] = true
				}
				walk(value, append(slices.Clone(path), key))
			}
		case []any:
			for i, value := range n {
				walk(value, append(slices.Clone(path), fmt.Sprint(i)))
			}
		}
	}
	walk(doc, nil)
	newline := map[string]bool{}
	for _, path := range globExamples(t, "examples/invalid/*--trailing_newline.json") {
		rule, err := ruleOf(strings.TrimSuffix(filepath.Base(path), ".json"), doc)
		if err != nil {
			t.Fatal(err)
		}
		newline[rule.location()] = true
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(raw, []byte(`\n"`)) {
			t.Errorf("%s: no value ending in a newline", path)
		}
	}
	if len(patterns) < 6 || fmt.Sprint(patterns) != fmt.Sprint(newline) {
		t.Errorf("patterns %v, trailing-newline examples for %v", patterns, newline)
	}
}

// Each golden example, received on pub/sub as the first message, prints exactly
// the expected line through the subscriber's own handler, and logs nothing.
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
			s.handle(string(payload), SourcePubSub, "orders:events")
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

// Each event type's golden data parses into its Go type, field for field, and the
// schema's type list is exactly the types the subscriber renders.
func TestContractEventDataParses(t *testing.T) {
	decoders := map[string]func([]byte) (any, error){
		TypeOrderPlaced:      decodeAs[OrderPlacedV1],
		TypePaymentCaptured:  decodeAs[PaymentCapturedV1],
		TypePaymentDeclined:  decodeAs[PaymentDeclinedV1],
		TypeInvoiceIssued:    decodeAs[InvoiceIssuedV1],
		TypeShipmentBooked:   decodeAs[ShipmentBookedV1],
		TypeCustomerNotified: decodeAs[CustomerNotifiedV1],
	}
	var types []string
	for _, v := range schemaDoc(t)["properties"].(map[string]any)["type"].(map[string]any)["enum"].([]any) {
		types = append(types, v.(string))
	}
	var known []string
	for typ := range eventLines {
		known = append(known, typ)
	}
	slices.Sort(types)
	slices.Sort(known)
	if !slices.Equal(types, known) {
		t.Errorf("schema types %v, subscriber renders %v", types, known)
	}
	covered := map[string]bool{}
	for name, want := range expectedData {
		t.Run(name, func(t *testing.T) {
			payload, err := os.ReadFile(filepath.Join(contractsDir, "examples", name))
			if err != nil {
				t.Fatal(err)
			}
			msg, err := ParseMessage(payload)
			if err != nil {
				t.Fatal(err)
			}
			covered[msg.Type] = true
			got, err := decoders[msg.Type](msg.Data)
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprintf("%#v", got) != fmt.Sprintf("%#v", want) {
				t.Errorf("data\n got %#v\nwant %#v", got, want)
			}
			if _, err := msg.Summary(); err != nil {
				t.Errorf("Summary: %v", err)
			}
		})
	}
	for _, typ := range types {
		if !covered[typ] {
			t.Errorf("no golden example of %s in expectedData", typ)
		}
	}
}

// decodeAs decodes data strictly into T: a field the Go type lacks is an error here,
// so a field added to the contract must be added to the Go type too.
func decodeAs[T any](data []byte) (any, error) {
	var v T
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	err := dec.Decode(&v)
	return v, err
}

// Whatever an invalid example breaks, the subscriber never crashes on it: it shows
// one line, or logs why it could not parse it.
func TestContractInvalidExamplesAreShownOrRefused(t *testing.T) {
	for _, path := range globExamples(t, "examples/invalid/*.json") {
		payload, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		out, logs := &syncBuffer{}, &syncBuffer{}
		s := NewSubscriber(DefaultConfig(), out, NewLogger("text", logs))
		s.handle(string(payload), SourceQueue, "orders:display")
		_ = s.client.Close()
		lines := out.lines()
		if len(lines) > 1 || (len(lines) == 0 && !strings.Contains(logs.String(), "Failed to parse message from queue")) {
			t.Errorf("%s: display %q, logs %q", filepath.Base(path), out, logs)
		}
	}
}
