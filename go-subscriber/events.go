package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// The domain event types of contracts/envelope.schema.json, each with its data shape
// (version 1) and the human line the subscriber shows for it. The subscriber reads
// the data itself rather than trusting the sender's "message", so a producer whose
// data and message disagree shows its data; a type it does not know (a newer
// producer) is shown with its "message", as a Hello message is.
const (
	// TypeOrderPlaced is sent by orders-api when an order is stored.
	TypeOrderPlaced = "OrderPlaced"
	// TypePaymentCaptured is sent by payment-service when the charge succeeded.
	TypePaymentCaptured = "PaymentCaptured"
	// TypePaymentDeclined is sent by payment-service when the charge was refused.
	TypePaymentDeclined = "PaymentDeclined"
	// TypeInvoiceIssued is sent by invoice-service.
	TypeInvoiceIssued = "InvoiceIssued"
	// TypeShipmentBooked is sent by shipping-service.
	TypeShipmentBooked = "ShipmentBooked"
	// TypeCustomerNotified is sent by email-service for each email to the customer.
	TypeCustomerNotified = "CustomerNotified"
)

// OrderLine is one line of an OrderPlaced event.
type OrderLine struct {
	SKU       string `json:"sku"`
	Quantity  int    `json:"quantity"`
	UnitPrice string `json:"unit_price"`
	LineTotal string `json:"line_total"`
}

// OrderPlacedV1 is OrderPlaced's data. Priority is "standard" when absent.
type OrderPlacedV1 struct {
	OrderID       int         `json:"order_id"`
	CustomerEmail string      `json:"customer_email"`
	Currency      string      `json:"currency"`
	Lines         []OrderLine `json:"lines"`
	Total         string      `json:"total"`
	Priority      string      `json:"priority,omitempty"`
}

// PaymentCapturedV1 is PaymentCaptured's data.
type PaymentCapturedV1 struct {
	OrderID   int    `json:"order_id"`
	PaymentID string `json:"payment_id"`
	Amount    string `json:"amount"`
	Currency  string `json:"currency"`
}

// PaymentDeclinedV1 is PaymentDeclined's data.
type PaymentDeclinedV1 struct {
	OrderID  int    `json:"order_id"`
	Reason   string `json:"reason"`
	Amount   string `json:"amount"`
	Currency string `json:"currency"`
}

// InvoiceIssuedV1 is InvoiceIssued's data.
type InvoiceIssuedV1 struct {
	OrderID       int    `json:"order_id"`
	InvoiceNumber string `json:"invoice_number"`
	Total         string `json:"total"`
	Currency      string `json:"currency"`
}

// ShipmentBookedV1 is ShipmentBooked's data.
type ShipmentBookedV1 struct {
	OrderID        int    `json:"order_id"`
	ShipmentID     string `json:"shipment_id"`
	Carrier        string `json:"carrier"`
	TrackingNumber string `json:"tracking_number"`
}

// CustomerNotifiedV1 is CustomerNotified's data; Step is "received",
// "payment_declined" or "shipped".
type CustomerNotifiedV1 struct {
	OrderID   int    `json:"order_id"`
	Step      string `json:"step"`
	MessageID string `json:"message_id"`
}

// eventLines renders each known type's version-1 data as its human line.
var eventLines = map[string]func(json.RawMessage) (string, error){
	TypeOrderPlaced: render(func(d OrderPlacedV1) (string, error) {
		if err := need(d.OrderID, "customer_email", d.CustomerEmail, "total", d.Total, "currency", d.Currency); err != nil {
			return "", err
		}
		items := 0
		for _, l := range d.Lines {
			items += l.Quantity
		}
		noun := "items"
		if items == 1 {
			noun = "item"
		}
		line := fmt.Sprintf("Order %d placed by %s: %d %s, %s %s", d.OrderID, d.CustomerEmail, items, noun, d.Total, d.Currency)
		if d.Priority != "" && d.Priority != "standard" {
			line += ", " + d.Priority
		}
		return line, nil
	}),
	TypePaymentCaptured: render(func(d PaymentCapturedV1) (string, error) {
		if err := need(d.OrderID, "payment_id", d.PaymentID, "amount", d.Amount, "currency", d.Currency); err != nil {
			return "", err
		}
		return fmt.Sprintf("Payment captured for order #%d: %s %s, payment %s", d.OrderID, d.Amount, d.Currency, d.PaymentID), nil
	}),
	TypePaymentDeclined: render(func(d PaymentDeclinedV1) (string, error) {
		if err := need(d.OrderID, "reason", d.Reason, "amount", d.Amount, "currency", d.Currency); err != nil {
			return "", err
		}
		return fmt.Sprintf("Payment declined for order #%d: %s, %s %s", d.OrderID, d.Reason, d.Amount, d.Currency), nil
	}),
	TypeInvoiceIssued: render(func(d InvoiceIssuedV1) (string, error) {
		if err := need(d.OrderID, "invoice_number", d.InvoiceNumber, "total", d.Total, "currency", d.Currency); err != nil {
			return "", err
		}
		return fmt.Sprintf("Invoice %s issued for order #%d: %s %s", d.InvoiceNumber, d.OrderID, d.Total, d.Currency), nil
	}),
	TypeShipmentBooked: render(func(d ShipmentBookedV1) (string, error) {
		if err := need(d.OrderID, "shipment_id", d.ShipmentID, "carrier", d.Carrier, "tracking_number", d.TrackingNumber); err != nil {
			return "", err
		}
		return fmt.Sprintf("Shipment booked for order #%d: %s, tracking %s, shipment %s", d.OrderID, d.Carrier, d.TrackingNumber, d.ShipmentID), nil
	}),
	TypeCustomerNotified: render(func(d CustomerNotifiedV1) (string, error) {
		if err := need(d.OrderID, "step", d.Step, "message_id", d.MessageID); err != nil {
			return "", err
		}
		step := strings.ReplaceAll(d.Step, "_", " ")
		return fmt.Sprintf("Customer notified for order #%d: %s, Message-ID %s", d.OrderID, step, d.MessageID), nil
	}),
}

// render decodes data into T, then formats it.
func render[T any](format func(T) (string, error)) func(json.RawMessage) (string, error) {
	return func(raw json.RawMessage) (string, error) {
		var d T
		if err := json.Unmarshal(raw, &d); err != nil {
			return "", err
		}
		return format(d)
	}
}

// need reports the first required field that is missing: an order_id below 1, or an
// empty string among the (name, value) pairs.
func need(orderID int, pairs ...string) error {
	if orderID < 1 {
		return errors.New("no order_id")
	}
	for i := 0; i+1 < len(pairs); i += 2 {
		if pairs[i+1] == "" {
			return errors.New("no " + pairs[i])
		}
	}
	return nil
}

// Summary is the human line shown for msg: for a known event type at version 1, the
// line rendered from its data; otherwise (Hello messages, unknown types or versions)
// its "message" as sent. The error says why known data could not be read; the
// summary is then "message".
func (msg Message) Summary() (string, error) {
	lineOf, known := eventLines[msg.Type]
	if !known || msg.Version != 1 {
		return msg.Message, nil
	}
	line, err := lineOf(msg.Data)
	if err != nil {
		return msg.Message, fmt.Errorf("%s data: %w", msg.Type, err)
	}
	return line, nil
}
