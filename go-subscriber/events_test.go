package main

import (
	"encoding/json"
	"strings"
	"testing"
)

// Summary: the line rendered from a known type's data, else the message as sent; a
// known type whose data cannot be read says why and falls back to the message.
func TestSummary(t *testing.T) {
	tests := []struct {
		name    string
		msg     Message
		want    string
		wantErr string
	}{
		{"hello", Message{Message: "Hello from Python #1"}, "Hello from Python #1", ""},
		{"unknown type (a newer producer)", Message{Type: "OrderRefunded", Version: 1, Message: "Refund for order #3", Data: json.RawMessage(`{"order_id":3}`)}, "Refund for order #3", ""},
		{"unknown version", Message{Type: TypeOrderPlaced, Version: 2, Message: "v2 line", Data: json.RawMessage(`{"order_id":3}`)}, "v2 line", ""},
		{"standard priority is not shown", Message{Type: TypeOrderPlaced, Version: 1, Data: json.RawMessage(
			`{"order_id":5,"customer_email":"a@b.c","currency":"EUR","lines":[{"sku":"A","quantity":1,"unit_price":"1.00","line_total":"1.00"}],"total":"1.00","priority":"standard"}`)},
			"Order 5 placed by a@b.c: 1 item, 1.00 EUR", ""},
		{"notified: received", Message{Type: TypeCustomerNotified, Version: 1, Data: json.RawMessage(`{"order_id":5,"step":"received","message_id":"<m@x>"}`)},
			"Customer notified for order #5: received, Message-ID <m@x>", ""},
		{"notified: payment declined", Message{Type: TypeCustomerNotified, Version: 1, Data: json.RawMessage(`{"order_id":5,"step":"payment_declined","message_id":"<m@x>"}`)},
			"Customer notified for order #5: payment declined, Message-ID <m@x>", ""},
		{"declined without amount (an older producer)", Message{Type: TypePaymentDeclined, Version: 1, Message: "Payment declined for order #6", Data: json.RawMessage(`{"order_id":6,"reason":"declined"}`)},
			"Payment declined for order #6", "PaymentDeclined data: no amount"},
		{"no order id", Message{Type: TypeShipmentBooked, Version: 1, Message: "m", Data: json.RawMessage(`{"shipment_id":"S","carrier":"DHL","tracking_number":"T"}`)},
			"m", "ShipmentBooked data: no order_id"},
		{"data of the wrong type", Message{Type: TypeInvoiceIssued, Version: 1, Message: "m", Data: json.RawMessage(`{"order_id":"7"}`)},
			"m", "InvoiceIssued data: json: cannot unmarshal string"},
		{"no data", Message{Type: TypePaymentCaptured, Version: 1, Message: "m"}, "m", "PaymentCaptured data: unexpected end of JSON input"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.msg.Summary()
			if got != tt.want {
				t.Errorf("Summary() = %q, want %q", got, tt.want)
			}
			if (err == nil) != (tt.wantErr == "") || (err != nil && !strings.Contains(err.Error(), tt.wantErr)) {
				t.Errorf("error = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

// Unreadable data of a known type is logged once and the message shown as sent.
func TestHandleLogsUnreadableData(t *testing.T) {
	out, logs := &syncBuffer{}, &syncBuffer{}
	s := NewSubscriber(DefaultConfig(), out, NewLogger("text", logs))
	t.Cleanup(func() { _ = s.client.Close() })
	s.handle(`{"id":"e","timestamp":"2026-11-28T10:15:02Z","message":"Payment declined for order #6","sender":"payment-service","count":6,"type":"PaymentDeclined","version":1,"data":{"order_id":6,"reason":"declined"}}`, SourceQueue, "l")
	if got, want := out.String(), "[2026-11-28 10:15:02] [payment-service] Payment declined for order #6 (ID: e) [Received #1 from queue]\n"; got != want {
		t.Errorf("display %q, want %q", got, want)
	}
	if got := logTexts(logs); len(got) != 1 || got[0] != "Unreadable PaymentDeclined from queue, shown as its message: PaymentDeclined data: no amount" {
		t.Errorf("logs %q", got)
	}
}
