"""A private Roundcube (Debian's roundcube package) behind a private lighttpd, for the interop
test tests/interop/test_roundcube.py. See docs/design/testing.md, "Roundcube".

Nothing system-wide is used but the installed code: Debian's tree (/var/lib/roundcube/public_html,
its symlinks into /usr/share/roundcube) is the document root, and ROUNDCUBE_CONFIG_DIR (read by
Roundcube's program/include/iniset.php) points Roundcube at a config directory of our own under
`base`, with its SQLite database, temp and log directories there too. lighttpd listens on a free
loopback port and starts php-cgi itself (mod_fastcgi, a unix socket under `base`).

    with RoundcubeWeb(tmp_dir, imap_port, smtp_port, cafile, hostname) as web:
        web.url  # "http://127.0.0.1:<port>/"
"""
from __future__ import annotations

import os
import socket
import sqlite3
import time
import urllib.request

from tests.daemons import Daemon, _write
from tests.environment import require_program
from tests.harness import free_port

DOCUMENT_ROOT = "/var/lib/roundcube/public_html"
DEBIAN_CONFIG = "/etc/roundcube"  # defaults.inc.php and mimetypes.php come from here
SCHEMA = "/usr/share/roundcube/SQL/sqlite.initial.sql"
PHP_CGI = "/usr/bin/php-cgi"

MIME_TYPES = {".css": "text/css", ".js": "text/javascript", ".png": "image/png",
              ".gif": "image/gif", ".jpg": "image/jpeg", ".svg": "image/svg+xml",
              ".ico": "image/x-icon", ".woff": "font/woff", ".woff2": "font/woff2",
              ".ttf": "font/ttf", ".eot": "application/vnd.ms-fontobject",
              ".html": "text/html", ".json": "application/json", ".txt": "text/plain"}


def php_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def lighttpd_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RoundcubeWeb(Daemon):
    """lighttpd + php-cgi serving Debian's Roundcube with a private configuration.

    Roundcube speaks IMAP with STARTTLS to `imap_port` and submission with STARTTLS and AUTH to
    `smtp_port`, both on 127.0.0.1, verifying the server's self-signed certificate against
    `cafile` as the only trusted root under the name `hostname` (TLS stays on and checked).
    Roundcube's IMAP and SMTP traces (imap_debug, smtp_debug) go to logs/imap.log and
    logs/smtp.log under `base`."""

    name = "lighttpd"

    def __init__(self, base: str, imap_port: int, smtp_port: int, cafile: str, hostname: str):
        super().__init__(base)
        self.lighttpd = require_program("lighttpd", "lighttpd")
        if not os.path.exists(PHP_CGI):
            from tests.environment import unavailable

            unavailable("php-cgi is not installed (Debian package php-cgi)")
        if not os.path.exists(os.path.join(DOCUMENT_ROOT, "index.php")):
            from tests.environment import unavailable

            unavailable("Roundcube is not installed (Debian packages roundcube roundcube-sqlite3)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.config_dir = os.path.join(base, "config")
        self.log_dir = os.path.join(base, "logs")
        self.temp_dir = os.path.join(base, "temp")
        self.database = os.path.join(base, "roundcube.db")
        for d in (self.config_dir, self.log_dir, self.temp_dir):
            os.makedirs(d, exist_ok=True)
        for name in ("defaults.inc.php", "mimetypes.php"):
            link = os.path.join(self.config_dir, name)
            if not os.path.lexists(link):
                os.symlink(os.path.join(DEBIAN_CONFIG, name), link)
        tls = (f"['ssl' => ['verify_peer' => true, 'verify_peer_name' => true, "
               f"'peer_name' => {php_string(hostname)}, 'cafile' => {php_string(cafile)}, "
               f"'allow_self_signed' => false]]")
        _write(os.path.join(self.config_dir, "config.inc.php"), f"""<?php
$config = [];
$config['db_dsnw'] = {php_string('sqlite:///' + self.database + '?mode=0600')};
$config['imap_host'] = {php_string(f'tls://127.0.0.1:{imap_port}')};
$config['imap_conn_options'] = {tls};
$config['imap_debug'] = true;
$config['smtp_host'] = {php_string(f'tls://127.0.0.1:{smtp_port}')};
$config['smtp_conn_options'] = {tls};
$config['smtp_user'] = '%u';
$config['smtp_pass'] = '%p';
$config['smtp_debug'] = true;
$config['log_driver'] = 'file';
$config['log_dir'] = {php_string(self.log_dir + '/')};
$config['temp_dir'] = {php_string(self.temp_dir + '/')};
$config['des_key'] = 'mailsuite-roundcube-test';  // 24 bytes (3DES)
$config['plugins'] = [];
$config['skin'] = 'elastic';
$config['language'] = 'en_US';
$config['enable_spellcheck'] = false;
$config['enable_installer'] = false;
$config['support_url'] = '';
$config['product_name'] = 'Roundcube Webmail';
$config['create_default_folders'] = true;
$config['session_lifetime'] = 30;
// Newest first by the Date header: with SORT advertised (RFC 5256) Roundcube asks the server
// (UID SORT), without it fetches the dates and sorts itself.
$config['message_sort_col'] = 'date';
$config['message_sort_order'] = 'DESC';
""")
        if not os.path.exists(self.database):
            with open(SCHEMA) as f, sqlite3.connect(self.database) as db:
                db.executescript(f.read())
        mime = ", ".join(f"{lighttpd_string(k)} => {lighttpd_string(v)}"
                         for k, v in MIME_TYPES.items())
        self.conf_path = os.path.join(base, "lighttpd.conf")
        _write(self.conf_path, f"""
server.modules = ("mod_access", "mod_fastcgi")
server.document-root = {lighttpd_string(DOCUMENT_ROOT)}
server.bind = "127.0.0.1"
server.port = {self.port}
server.errorlog = {lighttpd_string(os.path.join(base, 'lighttpd-error.log'))}
server.follow-symlink = "enable"
server.upload-dirs = ({lighttpd_string(self.temp_dir)})
index-file.names = ("index.php")
mimetype.assign = ({mime})
$HTTP["url"] =~ "^/(config|temp|logs|SQL|bin)(/|$)" {{ url.access-deny = ("") }}
fastcgi.server = (".php" => ((
    "socket" => {lighttpd_string(os.path.join(base, 'php.socket'))},
    "bin-path" => {lighttpd_string(PHP_CGI)},
    "max-procs" => 1,
    "bin-environment" => (
        "PHP_FCGI_CHILDREN" => "4",
        "PHP_FCGI_MAX_REQUESTS" => "10000",
        "ROUNDCUBE_CONFIG_DIR" => {lighttpd_string(self.config_dir)},
    ),
    "bin-copy-environment" => ("PATH", "LANG"),
)))
""")

    def command(self) -> list[str]:
        return [self.lighttpd, "-D", "-f", self.conf_path]

    def answers(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return False
        with urllib.request.urlopen(self.url, timeout=10) as response:
            return b"rcmloginuser" in response.read()

    def logs(self) -> list[str]:
        return [self.log_path, os.path.join(self.base, "lighttpd-error.log"),
                *(os.path.join(self.log_dir, n) for n in ("errors.log", "imap.log", "smtp.log"))]

    def log(self, name: str) -> str:
        """The text of logs/<name> ("imap.log", "smtp.log", "errors.log"), "" if absent."""
        try:
            with open(os.path.join(self.log_dir, name), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


# -- the browser: headless Chromium through chromedriver (selenium) -------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Headless as root needs --no-sandbox; the rest keeps Chromium off the network (no component
# updates, sync or first-run pages) and /dev/shm (small in containers).
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps",
                 "--disable-extensions", "--lang=en-US")


def chromium(user_data_dir: str, extra_args: list[str] | tuple[str, ...] = ()):
    """A selenium WebDriver on a fresh headless Chromium profile in `user_data_dir`, with
    `extra_args` on its command line too."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (*CHROMIUM_ARGS, *extra_args):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    # The driver's path is given, so selenium never runs its driver manager (no download).
    driver = webdriver.Chrome(options=options, service=Service(
        CHROMEDRIVER, log_output=os.path.join(user_data_dir + ".chromedriver.log")))
    # A 1280x800 viewport: the window's frame, whatever headless makes it, is added on top.
    driver.set_window_size(1280, 800)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight];")
    driver.set_window_size(1280 + 1280 - inner[0], 800 + 800 - inner[1])
    return driver


class RoundcubeUI:
    """Roundcube's Elastic skin driven through `driver`: every wait polls the page with a
    deadline (WebDriverWait), none sleeps."""

    def __init__(self, driver, web: RoundcubeWeb, timeout: float = 30.0):
        self.driver = driver
        self.web = web
        self.timeout = timeout
        self.failures = 0

    # -- waiting ----------------------------------------------------------------------------
    def wait(self, condition, message: str, timeout: float | None = None):
        """Poll `condition(driver)` until it is truthy; fail with `message` and Roundcube's
        error log at the deadline. Elements replaced while we look at them count as
        "not yet"."""
        from selenium.common.exceptions import (NoSuchElementException,
                                                StaleElementReferenceException, TimeoutException)
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout or self.timeout, poll_frequency=0.05,
                                 ignored_exceptions=(StaleElementReferenceException,
                                                     NoSuchElementException)).until(condition)
        except TimeoutException:
            self.failures += 1
            shot = os.path.join(self.web.base, f"timeout-{self.failures}.png")
            self.driver.switch_to.default_content()
            self.driver.save_screenshot(shot)
            raise AssertionError(f"timed out waiting for {message} (screenshot {shot}); "
                                 "Roundcube errors.log:\n"
                                 + self.web.log("errors.log")[-3000:]) from None

    def css(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def visible(self, selector: str) -> list:
        from selenium.webdriver.common.by import By

        return [e for e in self.driver.find_elements(By.CSS_SELECTOR, selector)
                if e.is_displayed()]

    def click(self, selector: str, what: str) -> None:
        """Click the first visible element matching `selector` once there is one."""
        self.wait(lambda d: self.visible(selector), what)[0].click()

    # -- log in, folders, the message list --------------------------------------------------
    def login(self, user: str, password: str) -> None:
        self.driver.get(self.web.url)
        self.wait(lambda d: self.visible("#rcmloginuser"), "the login form")
        self.css("#rcmloginuser").send_keys(user)
        self.css("#rcmloginpwd").send_keys(password)
        self.css("#rcmloginsubmit").click()
        # Roundcube ignores commands while a request is in flight (rcmail.busy): a click on
        # Compose right after the login page loads would be lost, so wait until it is idle.
        self.wait(lambda d: self.in_mail_list() and self.list_ready(),
                  f"the message list after {user} logs in")

    def open_folder(self, folder: str, expect: str | None = None) -> None:
        """Load the message list of `folder` (an IMAP name) afresh, as a click on the folder
        does after a reload; wait for a row with subject `expect` if given."""
        from urllib.parse import quote

        self.driver.get(f"{self.web.url}?_task=mail&_mbox={quote(folder)}")
        self.wait(lambda d: self.in_mail_list(folder) and self.list_ready(),
                  f"the message list of {folder}")
        if expect is not None:
            self.row(expect)

    def in_mail_list(self, folder: str | None = None) -> bool:
        """The page is Roundcube's mail view with its message list (of `folder` if given); an
        empty list has no visible table, so ask Roundcube's own state."""
        return self.driver.execute_script(
            "return !!(window.rcmail && rcmail.env.task == 'mail' && rcmail.message_list"
            " && (arguments[0] === null || rcmail.env.mailbox == arguments[0]));", folder)

    def list_ready(self) -> bool:
        """Roundcube has no request in flight (its busy flag and the loading indicator)."""
        return not self.driver.execute_script(
            "return !window.rcmail || rcmail.busy || !!document.querySelector('.loading');")

    def subjects(self) -> list[str]:
        """Subjects of the visible rows of the message list, top to bottom."""
        from selenium.webdriver.common.by import By

        return [r.find_element(By.CSS_SELECTOR, "span.subject").text
                for r in self.visible("#messagelist tbody tr.message")]

    def row(self, subject: str):
        """The visible row whose subject is `subject` (waits for it)."""
        from selenium.webdriver.common.by import By

        def find(d):
            for r in self.visible("#messagelist tbody tr.message"):
                if r.find_element(By.CSS_SELECTOR, "span.subject").text == subject:
                    return r
            return None

        return self.wait(find, f"a row with subject {subject!r} in the list")

    def select(self, subject: str) -> str:
        """Click the row of `subject`; wait until Roundcube has it selected, its preview loaded
        and no request in flight (a toolbar menu opened earlier closes again when the preview
        arrives); its UID."""
        row = self.row(subject)
        row.click()
        self.wait(lambda d: "selected" in row.get_attribute("class"), f"{subject!r} selected")
        uid = self.driver.execute_script("return String(rcmail.get_single_uid());")
        d = self.driver

        def shown(_):
            d.switch_to.default_content()
            loaded = d.execute_script(
                "const w = document.getElementById('messagecontframe').contentWindow;"
                "return w.location.href.includes('_uid=' + arguments[0] + '&')"
                " && w.document.readyState == 'complete'"
                " && !!w.rcmail && !w.rcmail.busy;", uid)
            if not loaded:
                return False
            d.switch_to.frame("messagecontframe")
            try:
                headings = self.visible("h2.subject")
                return bool(headings) and subject in headings[0].text
            finally:
                d.switch_to.default_content()

        self.wait(shown, f"the preview of {subject!r}")
        self.wait(lambda _: self.list_ready(), "Roundcube idle after the preview")
        return uid

    def preview(self, subject: str) -> str:
        """Select `subject` and switch into the frame of its preview (switch back with
        driver.switch_to.default_content()); its UID."""
        uid = self.select(subject)
        self.driver.switch_to.frame("messagecontframe")
        return uid

    def search(self, text: str) -> None:
        box = self.css("#mailsearchform")
        box.clear()
        from selenium.webdriver.common.keys import Keys

        box.send_keys(text, Keys.ENTER)

    def menu_item(self, toolbar_button: str, menu: str, item: str, what: str) -> None:
        """Open a toolbar popup menu (e.g. Mark, More) and click one of its items. Roundcube
        closes an open menu when a request it started earlier ends (a preview or list refresh
        after a flag change): the button is clicked again whenever the menu is closed."""
        button = f"#toolbar-menu a.{toolbar_button}"
        entry = f"#{menu} a.{item}"
        clicked = [float("-inf")]

        def opened(_):
            shown = self.visible(entry)
            if shown:
                return shown
            # Closed, and not just opening (a second click would close it again).
            if not self.visible(f"#{menu}") and time.monotonic() - clicked[0] > 2:
                self.click(button, f"the {toolbar_button} button")
                clicked[0] = time.monotonic()
            return False

        self.wait(opened, what)[0].click()
