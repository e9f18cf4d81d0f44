"""The HTML invoice of an order, rendered once an InvoiceIssued event is recorded.

Jinja with autoescape on: every value from the order (e-mail, SKUs) is escaped.
"""

from __future__ import annotations

import json

from jinja2 import Environment

from messaging import envelope
from orders.models import Order
from orders.money import format_money

_ENV = Environment(autoescape=True)
_TEMPLATE = _ENV.from_string(
    """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Invoice {{ number }}</title></head>
<body>
<h1>Invoice {{ number }}</h1>
<p>Order {{ order.id }} for {{ customer_email }}, placed {{ placed }}</p>
<table>
<thead><tr><th>SKU</th><th>Quantity</th><th>Unit price</th><th>Line total</th></tr></thead>
<tbody>
{% for line in lines %}<tr><td>{{ line.sku }}</td><td>{{ line.quantity }}</td>\
<td>{{ line.unit_price }}</td><td>{{ line.line_total }}</td></tr>
{% endfor %}</tbody>
<tfoot><tr><th colspan="3">Total</th><td>{{ total }} {{ order.currency }}</td></tr></tfoot>
</table>
</body>
</html>
"""
)


def invoice_number(order: Order) -> str | None:
    """The number of the order's recorded invoice, or None if none is recorded."""
    for entry in order.history:
        if entry.type == envelope.INVOICE_ISSUED:
            return str(json.loads(entry.data).get("invoice_number", ""))
    return None


def render_invoice(order: Order, number: str, *, customer_email: str | None = None) -> str:
    """The invoice page (HTML, every value escaped); ``customer_email`` as shown (masked)."""
    return _TEMPLATE.render(
        number=number,
        order=order,
        customer_email=order.customer_email if customer_email is None else customer_email,
        placed=order.created_at.isoformat(timespec="seconds"),
        lines=[
            {
                "sku": line.sku,
                "quantity": line.quantity,
                "unit_price": format_money(line.unit_price),
                "line_total": format_money(line.line_total),
            }
            for line in order.lines
        ],
        total=format_money(order.total),
    )
