"""Acceptance: the admin dashboard in headless Chromium (Debian `chromium` + `chromium-driver`,
through selenium as tests/roundcube.py drives it), over HTTPS with the server's own certificate
pinned (`--ignore-certificate-errors-spki-list`: that key only, not "any certificate").

An admin logs in through the form, mail is sent with smtplib, the overview's plots show it as a
non-zero SVG bar; a message to a remote domain whose MX answers 451 waits in the queue, and the
Retry button of the queue page has it delivered. Every page is photographed; with
MAILSUITE_UPDATE_SCREENSHOT=1 the pictures replace docs/admin-*.png.
"""
from __future__ import annotations

import base64
import hashlib
import os
import smtplib
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.dashboard import ADMIN, ADMIN_PASSWORD, add_admin
from tests.dnsserver import DNSServer
from tests.environment import require_program
from tests.harness import MailServer
from tests.polling import wait_until
from tests.roundcube import CHROMEDRIVER, chromium
from tests.scenario.test_outbound import SinkServer, zone

pytestmark = [pytest.mark.external, pytest.mark.timeout(240)]

PASSWORD = "secret-pw-1"
ALICE = "alice@example.org"
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "docs")
PAGES = ("overview", "queue", "domains", "users", "trace", "reports")


@pytest.fixture(scope="module", autouse=True)
def programs():
    """Before any fixture starts something: skip, or fail under CI."""
    require_program("chromium", "chromium")
    require_program(os.path.basename(CHROMEDRIVER), "chromium-driver")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A server whose remote deliveries go to a sink that answers 451 to the first RCPT of each
    `later*` address (tests/scenario/test_outbound.py), with an admin and alice@."""
    base = str(tmp_path_factory.mktemp("admin-chromium"))
    with SinkServer() as sink, DNSServer({"sink.test": zone("sink.test")}) as dns:
        server = MailServer(os.path.join(base, "server"), extra={
            "courier": {"nameservers": [dns.nameserver], "mx_port": sink.port,
                        "connect_timeout": 5, "command_timeout": 10},
            # The first retry long after the test: only the Retry button brings it sooner.
            "queue": {"retry_schedule": [3600], "scan_interval": 1.0},
        })
        server.start()
        try:
            server.add_user(ALICE)
            add_admin(server)
            yield server, sink
        finally:
            server.stop()


@pytest.fixture(scope="module")
def browser(world, tmp_path_factory):
    server, _ = world
    profile = str(tmp_path_factory.mktemp("chromium-profile"))
    driver = chromium(profile, extra_args=[
        f"--ignore-certificate-errors-spki-list={spki_pin(server.cafile)}"])
    try:
        yield driver
    finally:
        driver.quit()


def spki_pin(cert_path: str) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of the certificate, as Chromium wants it."""
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def url(server: MailServer, path: str) -> str:
    return f"https://127.0.0.1:{server.ports['admin']}{path}"


def css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def send(server: MailServer, to: str, subject: str) -> None:
    message = (f"From: {ALICE}\r\nTo: {to}\r\nSubject: {subject}\r\n"
               f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\n\r\nHello.\r\n")
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=server.ssl_context())
        s.login(ALICE, PASSWORD)
        s.sendmail(ALICE, [to], message)


def bar_values(driver, chart_title: str) -> list[float]:
    for chart in css(driver, "svg.chart"):
        if chart.get_attribute("aria-label") == chart_title:
            return [float(bar.get_attribute("data-value"))
                    for bar in chart.find_elements("css selector", "rect.bar.s0")]
    return []


def screenshot(driver, tmp_path_factory, name: str) -> None:
    target = (DOCS if os.environ.get("MAILSUITE_UPDATE_SCREENSHOT") == "1"
              else str(tmp_path_factory.getbasetemp()))
    assert driver.save_screenshot(os.path.join(target, f"admin-{name}.png"))


def test_login_send_see_the_plot_and_retry_a_deferred_entry(world, browser, tmp_path_factory):
    server, sink = world
    browser.get(url(server, "/overview"))
    wait_until(lambda: browser.current_url.endswith("/login"), 30, 0.2, "not sent to /login")
    screenshot(browser, tmp_path_factory, "login")
    css(browser, "input[name=name]")[0].send_keys(ADMIN)
    css(browser, "input[name=password]")[0].send_keys(ADMIN_PASSWORD)
    css(browser, "form.login button")[0].click()
    wait_until(lambda: browser.current_url.endswith("/overview"), 30, 0.2, "login failed")
    # The session cookie as the browser holds it.
    cookie = next(c for c in browser.get_cookies() if c["name"] == "__Host-mailsuite-admin")
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # Mail: one to a local user, one to a remote MX that answers 451 (deferred, queued).
    send(server, ALICE, "local one")
    send(server, "later-1@sink.test", "deferred one")

    def deferred_in_queue() -> bool:
        browser.get(url(server, "/overview"))
        return sum(bar_values(browser, "Queue entries by age")) >= 1
    wait_until(deferred_in_queue, 60, 0.5, "the queue plot shows no entry")

    def messages_plotted() -> bool:  # the statistics of mailsuite.events, written in batches
        browser.get(url(server, "/overview"))
        return sum(bar_values(browser, "Messages per hour, last 24 h (UTC)")) >= 2
    wait_until(messages_plotted, 60, 0.5, "the hourly plot shows no message")
    screenshot(browser, tmp_path_factory, "overview")

    # The queue page: the deferred entry, with the 451 it got; Retry delivers it.
    browser.get(url(server, "/queue"))
    rows = css(browser, "tr[id^=q-]")
    assert len(rows) == 1 and "451" in rows[0].text and "later-1@sink.test" in rows[0].text
    queue_id = rows[0].get_attribute("id")[2:]
    screenshot(browser, tmp_path_factory, "queue")
    assert sink.state.seen["later-1@sink.test"] == 1
    css(browser, f"form[action='/queue/{queue_id}/retry'] button")[0].click()
    wait_until(lambda: "due for delivery now" in browser.page_source, 30, 0.2,
               "no notice after Retry")
    wait_until(lambda: any(m.recipients == ["later-1@sink.test"] for m in sink.state.messages),
               60, 0.2, "the retried message never reached the MX")
    def queue_emptied() -> bool:
        browser.get(url(server, "/queue"))
        return not css(browser, "tr[id^=q-]")
    wait_until(queue_emptied, 60, 0.5, "the entry stayed in the queue")
    assert not any(name.startswith(queue_id) for name in os.listdir(server.config().queue_dir))

    # The other pages, for the documentation.
    for page in ("domains", "users", "reports"):
        browser.get(url(server, f"/{page}"))
        assert css(browser, "h1"), page
        screenshot(browser, tmp_path_factory, page)
    browser.get(url(server, f"/trace?q={queue_id}"))
    wait_until(lambda: "later-1@sink.test" in browser.page_source, 10, 0.2, "no trace")
    screenshot(browser, tmp_path_factory, "trace")
