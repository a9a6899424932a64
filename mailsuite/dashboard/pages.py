"""The dashboard's HTML, rendered on the server from plain data: no script, no external asset,
a little inline CSS. Every value from the directory, the spool or a client is escaped here (`_e`);
every form that changes something is a POST carrying the session's CSRF token (`form`).
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import quote

from mailsuite.dashboard import svg
from mailsuite.queue.admin import QueueSnapshot, format_duration, format_next
from mailsuite.queue.spool import QueueEntry

NAV = (("/overview", "Overview"), ("/queue", "Queue"), ("/domains", "Domains"),
       ("/users", "Users"), ("/trace", "Message trace"), ("/reports", "DMARC / TLS reports"))

_STYLE = """
body{font:14px/1.4 sans-serif;margin:0;color:#222;background:#fafafa}
header{display:flex;gap:1.5em;align-items:center;padding:.6em 1.2em;background:#234;color:#fff}
header a{color:#dde;text-decoration:none}header a:hover{text-decoration:underline}
nav{display:flex;gap:1.2em}header form{margin-left:auto}main{padding:1em 1.5em;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0 1.5em;background:#fff}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef}td.n{text-align:right}form.inline{display:inline}
.notice{padding:.5em 1em;background:#ffd;border:1px solid #cc9;margin-bottom:1em}
.missing{padding:.5em 1em;background:#eee;border:1px dashed #999}
.charts svg{background:#fff;border:1px solid #ddd;margin:0 1em 1em 0}
.figures{display:flex;gap:2em;margin-bottom:1em}.figures b{font-size:1.6em;display:block}
pre{background:#fff;border:1px solid #ccc;padding:.5em;overflow:auto;max-height:30em}
"""


@dataclass
class Frame:
    """What every page shows around its content."""

    hostname: str
    admin: str = ""  # "" before login: no navigation
    csrf: str = ""
    notice: str = ""


def page(frame: Frame, title: str, body: str) -> bytes:
    nav = ""
    if frame.admin:
        links = "".join(f'<a href="{href}">{_e(text)}</a>' for href, text in NAV)
        nav = (f"<nav>{links}</nav>"
               + form("/logout", frame.csrf, "", f"Log out {frame.admin}"))
    notice = f'<p class="notice" role="status">{_e(frame.notice)}</p>' if frame.notice else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)} - mailsuite admin</title><style>{_STYLE}</style></head>"
            f"<body><header><b>mailsuite admin</b><span>{_e(frame.hostname)}</span>{nav}"
            f"</header><main><h1>{_e(title)}</h1>{notice}{body}</main></body></html>"
            ).encode("utf-8")


def form(action: str, csrf: str, fields: str, button: str, css: str = "inline") -> str:
    return (f'<form class="{css}" method="post" action="{_e(action)}">'
            f'<input type="hidden" name="csrf" value="{_e(csrf)}">{fields}'
            f'<button type="submit">{_e(button)}</button></form>')


def missing(what: str) -> str:
    return f'<p class="missing">{_e(what)} not available in this server.</p>'


# -- login ----------------------------------------------------------------------------------------
def login(token: str, failed: bool = False) -> str:
    error = '<p class="notice" role="alert">Wrong name or password.</p>' if failed else ""
    return (f"{error}"
            + form("/login", token,
                   '<p><label>Name <input name="name" autocomplete="username" required '
                   'autofocus></label></p><p><label>Password <input name="password" '
                   'type="password" autocomplete="current-password" required></label></p>',
                   "Log in", css="login"))


# -- overview -------------------------------------------------------------------------------------
@dataclass
class Overview:
    hours: list[int] = field(default_factory=list)  # bucket starts of the last 24 h
    hourly_in: list[int] = field(default_factory=list)
    hourly_out: list[int] = field(default_factory=list)
    days: list[int] = field(default_factory=list)  # day starts (UTC) of the last 30 days
    daily_in: list[int] = field(default_factory=list)
    daily_out: list[int] = field(default_factory=list)
    outcomes: Mapping[str, int] = field(default_factory=dict)
    rejects: Mapping[str, int] = field(default_factory=dict)


QUEUE_AGES = ((300, "< 5 min"), (3600, "5-60 min"), (6 * 3600, "1-6 h"), (86400, "6-24 h"),
              (float("inf"), "> 1 day"))


def overview(stats: Overview | None, queue: QueueSnapshot, now: float) -> str:
    pending = queue.pending()
    held = sum(1 for e in queue.entries if e.held)
    ages = [0] * len(QUEUE_AGES)
    for entry in queue.entries:
        age = now - entry.created
        ages[next(i for i, (limit, _) in enumerate(QUEUE_AGES) if age < limit)] += 1
    figures = (f'<div class="figures"><div><b id="queue-length">{len(queue.entries)}</b>'
               f'queue entries</div><div><b>{pending}</b>recipients pending</div>'
               f'<div><b>{held}</b>held</div></div>')
    queue_chart = svg.bar_chart("Queue entries by age", [label for _, label in QUEUE_AGES],
                                [svg.Series("entries", ages)])
    if stats is None:
        return (figures + '<div class="charts">' + queue_chart + "</div>"
                + missing("Message statistics (mailsuite.events)"))
    hourly = svg.bar_chart(
        "Messages per hour, last 24 h (UTC)", [time.strftime("%H", time.gmtime(h))
                                               for h in stats.hours],
        [svg.Series("in", stats.hourly_in), svg.Series("out", stats.hourly_out)], label_every=3)
    daily = svg.bar_chart(
        "Messages per day, last 30 days", [time.strftime("%d.%m", time.gmtime(d))
                                           for d in stats.days],
        [svg.Series("in", stats.daily_in), svg.Series("out", stats.daily_out)], label_every=5)
    charts = [hourly, daily,
              _totals_chart("Deliveries by outcome, last 24 h", stats.outcomes),
              _totals_chart("Rejects by reason, last 24 h", stats.rejects), queue_chart]
    return (figures + '<p>In: messages accepted into the queue. Out: deliveries that succeeded '
            '(local and remote recipients).</p><div class="charts">' + "".join(charts)
            + "</div>")


def _totals_chart(title: str, totals: Mapping[str, int]) -> str:
    items = list(totals.items())[:12] or [("none", 0)]
    return svg.bar_chart(title, [k for k, _ in items], [svg.Series("count", [v for _, v in items])])


# -- queue ----------------------------------------------------------------------------------------
QUEUE_ACTIONS = ("retry", "hold", "release", "delete")


def queue(snapshot: QueueSnapshot, now: float, csrf: str, limit: int) -> str:
    parts = []
    for problem in snapshot.damaged:
        parts.append(f'<p class="notice">Damaged: {_e(problem)}</p>')
    if snapshot.leftovers:
        parts.append(f"<p>{len(snapshot.leftovers)} file(s) in the spool are not part of an "
                     "entry (<code>mailsuite queue list</code> tells which).</p>")
    if not snapshot.entries:
        return "".join(parts) + "<p>The queue is empty.</p>"
    entries = sorted(snapshot.entries, key=lambda e: e.created)
    if len(entries) > limit:
        parts.append(f"<p>The oldest {limit} of {len(entries)} entries.</p>")
    rows = []
    for entry in entries[:limit]:
        rcpts = "<br>".join(_recipient(r, now) for r in entry.recipients)
        rows.append(f'<tr id="q-{_e(entry.id)}"><td><a href="/queue/{quote(entry.id)}">'
                    f"{_e(entry.id)}</a>{' <b>held</b>' if entry.held else ''}</td>"
                    f"<td>{_e(format_duration(now - entry.created))}</td>"
                    f"<td>&lt;{_e(entry.sender)}&gt;</td><td>{rcpts}</td>"
                    f"<td>{queue_buttons(entry, csrf)}</td></tr>")
    return ("".join(parts) + "<table><tr><th>Queue id</th><th>Age</th><th>From</th>"
            "<th>Recipients</th><th>Actions</th></tr>" + "".join(rows) + "</table>")


def queue_buttons(entry: QueueEntry, csrf: str) -> str:
    shown = ("retry", "release" if entry.held else "hold", "delete")
    return " ".join(form(f"/queue/{quote(entry.id)}/{action}", csrf, "", action.capitalize())
                    for action in shown)


def queue_entry(entry: QueueEntry | None, problem: str, headers: str, now: float,
                csrf: str, queue_id: str) -> str:
    if entry is None:
        return (f'<p class="notice">{_e(problem)}</p>'
                + form(f"/queue/{quote(queue_id)}/delete", csrf, "", "Delete"))
    meta = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in entry.meta.items())
    rcpts = "".join(f"<li>{_recipient(r, now)}</li>" for r in entry.recipients)
    return (f"<table><tr><th>Queue id</th><td>{_e(entry.id)}</td></tr>"
            f"<tr><th>From</th><td>&lt;{_e(entry.sender)}&gt;</td></tr>"
            f"<tr><th>Age</th><td>{_e(format_duration(now - entry.created))}</td></tr>"
            f"<tr><th>Held</th><td>{'yes' if entry.held else 'no'}</td></tr>{meta}</table>"
            f"<h2>Recipients</h2><ul>{rcpts}</ul><p>{queue_buttons(entry, csrf)}</p>"
            f"<h2>Headers</h2><pre>{_e(headers)}</pre>")


def _recipient(r: Any, now: float) -> str:
    text = f"{_e(r.address)} <i>{_e(r.state)}</i>"
    if r.state == "pending":
        text += f", {r.attempts} attempt(s), next {_e(format_next(r.next_attempt, now))}"
    if r.last_error:
        text += f"<br><small>{_e(r.last_error)}</small>"
    return text


# -- domains and users ----------------------------------------------------------------------------
def domains(found: Sequence[Any], csrf: str) -> str:
    rows = "".join(f'<tr><td><a href="/users?domain={quote(d.name)}">{_e(d.name)}</a></td>'
                   f'<td class="n">{d.users}</td><td class="n">{d.aliases}</td>'
                   f"<td>{_e(d.created.strftime('%Y-%m-%d'))}</td></tr>" for d in found)
    table = ("<table><tr><th>Domain</th><th>Users</th><th>Aliases</th><th>Added</th></tr>"
             + rows + "</table>") if found else "<p>No domain yet.</p>"
    return (table + "<h2>Add a domain</h2>"
            + form("/domains/add", csrf, '<input name="domain" placeholder="example.org" '
                   'required> ', "Add domain", css="add"))


def users(found: Sequence[Any], domain: str, csrf: str) -> str:
    rows = []
    for u in found:
        toggle = form("/users/disable" if u.enabled else "/users/enable", csrf,
                      _hidden("address", u.address), "Disable" if u.enabled else "Enable")
        reset = form("/users/password", csrf, _hidden("address", u.address)
                     + '<input name="password" type="password" autocomplete="new-password" '
                       'placeholder="new password" required> ', "Reset password")
        rows.append(f"<tr><td>{_e(u.address)}</td><td>{'yes' if u.enabled else '<b>no</b>'}"
                    f"</td><td>{_e(u.created.strftime('%Y-%m-%d'))}</td>"
                    f"<td>{toggle} {reset}</td></tr>")
    scope = f" of {_e(domain)}" if domain else ""
    table = (f"<p>{len(found)} user(s){scope}.</p><table><tr><th>Address</th><th>Logins "
             "enabled</th><th>Added</th><th>Actions</th></tr>" + "".join(rows) + "</table>"
             ) if found else f"<p>No user{scope}.</p>"
    return (table + "<h2>Add a user</h2>"
            + form("/users/add", csrf, '<input name="address" placeholder="user@example.org" '
                   'required> <input name="password" type="password" '
                   'autocomplete="new-password" placeholder="password" required> ', "Add user",
                   css="add"))


# -- message trace --------------------------------------------------------------------------------
def trace_form(query: str) -> str:
    return ('<form method="get" action="/trace"><input name="q" size="50" '
            f'value="{_e(query)}" placeholder="queue id, &lt;message-id&gt; or address"> '
            '<button type="submit">Trace</button></form>')


def trace(query: str, events: Sequence[Any] | None, problem: str = "") -> str:
    body = trace_form(query)
    if problem:
        return body + f'<p class="notice">{_e(problem)}</p>'
    if events is None:
        return body
    if not events:
        return body + f"<p>No recorded message matches {_e(query)}.</p>"
    groups: dict[str, list[Any]] = {}
    for event in events:
        groups.setdefault(event.queue_id, []).append(event)
    for queue_id, group in groups.items():
        rows = "".join(
            f"<tr><td>{_e(_when(e.time))}</td><td>{_e(e.kind)}</td><td>{_e(e.address or '')}"
            f"</td><td>{_fields(e.fields)}</td></tr>" for e in group)
        message_id = next((e.message_id for e in group if e.message_id), "")
        body += (f'<h2 class="trace">{_e(queue_id)} {_e(message_id)}</h2><table><tr><th>Time'
                 "</th><th>Event</th><th>Address</th><th>Details</th></tr>" + rows + "</table>")
    return body


def _fields(fields: Mapping[str, Any]) -> str:
    return "<br>".join(f"{_e(k)}={_e(_value(v))}" for k, v in fields.items()
                       if v not in (None, ""))


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


# -- DMARC and TLS reports ------------------------------------------------------------------------
def reports(domain: str, hosted: Iterable[str], dmarc: Sequence[Any],
            tls: Sequence[Any]) -> str:
    options = "".join(f'<option value="{_e(d)}"{" selected" if d == domain else ""}>{_e(d)}'
                      "</option>" for d in ["", *hosted])
    body = ('<form method="get" action="/reports"><label>Domain <select name="domain">'
            f'{options}</select></label> <button type="submit">Show</button></form>')
    body += "<h2>DMARC aggregate reports received</h2>"
    if dmarc:
        rows = "".join(
            f"<tr><td>{_e(r.domain)}</td><td>{_e(r.source_ip)}</td><td class=\"n\">{r.messages}"
            f"</td><td class=\"n\">{_percent(r.dmarc_pass, r.messages)}</td><td class=\"n\">"
            f"{_percent(r.dkim_pass, r.messages)}</td><td class=\"n\">"
            f"{_percent(r.spf_pass, r.messages)}</td><td>{_e(r.reporters)}</td></tr>"
            for r in dmarc)
        failing = sorted(((r.source_ip, r.messages - r.dmarc_pass) for r in dmarc
                          if r.messages > r.dmarc_pass), key=lambda x: -x[1])[:12]
        body += ("<p>Who sends mail as the domain, as other organisations report it.</p>"
                 "<table><tr><th>Domain</th><th>Source IP</th><th>Messages</th><th>DMARC pass"
                 "</th><th>DKIM pass</th><th>SPF pass</th><th>Reported by</th></tr>" + rows
                 + "</table>")
        if failing:
            body += svg.bar_chart("Messages failing DMARC by source IP",
                                  [ip for ip, _ in failing],
                                  [svg.Series("failing", [n for _, n in failing])])
    else:
        body += "<p>No DMARC report received.</p>"
    body += "<h2>TLS reports received (RFC 8460)</h2>"
    if tls:
        rows = "".join(f"<tr><td>{_e(r.domain)}</td><td>{_e(r.policy_type)}</td><td>"
                       f"{_e(r.result_type)}</td><td class=\"n\">{r.sessions}</td><td>"
                       f"{_e(r.reporters)}</td></tr>" for r in tls)
        body += ("<table><tr><th>Domain</th><th>Policy</th><th>Result</th><th>Sessions</th>"
                 "<th>Reported by</th></tr>" + rows + "</table>")
    else:
        body += "<p>No TLS report received.</p>"
    return body


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f} %" if whole else "-"


# -- helpers --------------------------------------------------------------------------------------
def _hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{_e(name)}" value="{_e(value)}">'


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
