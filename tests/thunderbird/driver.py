"""Drive a real Thunderbird (Debian's ESR build) headless through Marionette.

One `Thunderbird` is one process with a fresh profile: quiet, offline at start (so nothing
connects, and no password prompt appears, before the test has set passwords), isolated from the
network, with the test server's self-signed certificate imported as a CA into the profile's NSS
database (never TLS switched off). Chrome-context JavaScript does the work; see
docs/design/testing.md ("Driving Thunderbird") for the pitfalls this follows.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

from tests.harness import subprocess_env
from tests.polling import wait_until

BINARY = "/usr/lib/thunderbird/thunderbird"  # the real binary, not the /usr/bin wrapper

# Quiet, offline, isolated start (docs/design/testing.md, "Driving Thunderbird").
BASE_PREFS: dict[str, Any] = {
    "mail.provider.enabled": False,
    "mail.provider.suppress_dialog_on_startup": True,
    "mailnews.start_page.enabled": False,
    "mail.shell.checkDefaultClient": False,
    "mail.rights.override": True,
    "mail.spotlight.firstRunDone": True,
    "mail.inappnotifications.enabled": False,
    "mail.winsearch.firstRunDone": True,
    "mail.account.manager.wizard.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.unified": False,
    "app.update.disabledForTesting": True,
    "app.update.auto": False,
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.trr.mode": 5,
    "network.dns.native-is-localhost": True,  # every host name is 127.0.0.1
    "services.settings.server": "data:,#dummy/v1",
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "mail.biff.show_alert": False,
    "mail.biff.play_sound": False,
    "mail.biff.show_tray_icon": False,
    "mail.biff.use_system_alert": False,
    "mail.startup.enabledMailCheckOnce": True,
    "mailnews.auto_config.guess.enabled": False,
    "offline.startup_state": 3,  # start offline
    "offline.autoDetect": False,
    "offline.download.download_messages": 2,  # never ask about downloading for offline use
    "mail.check_all_imap_folders_for_new": False,
    "mail.server.default.check_new_mail": False,
    "mail.server.default.login_at_startup": False,
    "mail.server.default.autosync_offline_stores": False,
    "mail.server.default.offline_download": False,
    "mail.imap.use_status_for_biff": False,
    "mailnews.headers.showSender": False,
    "mail.tabs.drawInTitlebar": False,
    "mail.uidensity": 1,
    # SMTP and POP3 are JavaScript in Thunderbird 153: their traces go to the console, which
    # these prefs send to stdout, i.e. <profile>.log (IMAP is traced with MOZ_LOG instead).
    "mailnews.smtp.loglevel": "All",
    "mailnews.pop3.loglevel": "All",
    "devtools.console.stdout.chrome": True,
    "browser.dom.window.dump.enabled": True,
}


class ThunderbirdError(AssertionError):
    """Thunderbird failed a step: the JavaScript error and any dialog it showed."""


class Thunderbird:
    def __init__(self, profile_dir: str, prefs: dict[str, Any] | None = None,
                 cafile: str | None = None,
                 cert_overrides: list[tuple[str, int, str]] | None = None):
        """`cafile`: a CA certificate (PEM) to import into the profile as trusted for servers.
        `cert_overrides`: (host, port, PEM path) for a self-signed server certificate: what
        "Confirm Security Exception" stores, pre-seeded in cert_override.txt."""
        self.profile_dir = profile_dir
        self.prefs = dict(BASE_PREFS)
        self.prefs.update(prefs or {})
        self.cafile = cafile
        self.cert_overrides = list(cert_overrides or [])
        self.log_path = profile_dir + ".log"
        self.protocol_log_path = profile_dir + ".protocol.log"
        self.process: subprocess.Popen | None = None
        self.client: Any = None

    # -- life cycle -------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "Thunderbird":
        return self.launch().connect(timeout)

    def launch(self) -> "Thunderbird":
        """Write the profile and start the process (several can start side by side)."""
        os.makedirs(self.profile_dir, exist_ok=True)
        port = _free_port()
        self.prefs["marionette.port"] = port
        with open(os.path.join(self.profile_dir, "user.js"), "w") as f:
            for name, value in self.prefs.items():
                f.write(f"user_pref({json.dumps(name)}, {json.dumps(value)});\n")
        if self.cafile:
            self._import_ca(self.cafile)
        if self.cert_overrides:
            self._write_cert_overrides()
        env = subprocess_env(MOZ_DISABLE_NONLOCAL_CONNECTIONS="1", MOZ_CRASHREPORTER_DISABLE="1",
                             MOZ_HEADLESS="1", MOZ_HEADLESS_WIDTH="1280",
                             MOZ_HEADLESS_HEIGHT="800")
        env.pop("DISPLAY", None)
        # Thunderbird's own protocol trace: what it sent and what it got, for failure reports.
        env["MOZ_LOG"] = "IMAP:5,IMAP_CS:5,SMTP:5,POP3:5,timestamp,sync"
        env["MOZ_LOG_FILE"] = self.protocol_log_path
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [BINARY, "--headless", "--marionette", "--remote-allow-system-access", "--no-remote",
             "--profile", self.profile_dir],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self._launched = time.monotonic()
        return self

    def connect(self, timeout: float = 30.0) -> "Thunderbird":
        """Wait for Marionette and open a chrome-context session."""
        from marionette_driver.marionette import Marionette

        port = self.prefs["marionette.port"]

        def listening() -> bool:
            if self.process.poll() is not None:
                raise ThunderbirdError(f"thunderbird exited with {self.process.returncode}:\n"
                                       f"{self.log_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                return False

        try:  # the timeout counts from the launch
            wait_until(listening, timeout=max(0.0, self._launched + timeout - time.monotonic()),
                       interval=0.05, message="Marionette")
        except AssertionError:
            self.kill()
            raise ThunderbirdError("Marionette did not start:\n" + self.log_text()[-3000:])
        self.client = Marionette(host="127.0.0.1", port=port, startup_timeout=timeout)
        # "ignore": a modal dialog must not abort the running script silently; the dialog
        # watcher below records its text and closes it, and the step fails with that text.
        self.client.start_session(capabilities={"unhandledPromptBehavior": "ignore"})
        self.client.set_context(self.client.CONTEXT_CHROME)
        self.run(_DIALOG_WATCHER)
        return self

    def _import_ca(self, cafile: str) -> None:
        db = "sql:" + self.profile_dir
        subprocess.run(["certutil", "-N", "--empty-password", "-d", db], check=True,
                       capture_output=True, env=subprocess_env())
        # The self-signed server certificate is its own CA (basicConstraints CA:TRUE).
        subprocess.run(["certutil", "-A", "-n", "mailsuite-test-ca", "-t", "C,,", "-i", cafile,
                        "-d", db], check=True, capture_output=True, env=subprocess_env())

    def _write_cert_overrides(self) -> None:
        # mozilla::pkix refuses a CA certificate as a server's own certificate
        # (MOZILLA_PKIX_ERROR_CA_CERT_USED_AS_END_ENTITY), so a self-signed certificate with
        # basicConstraints CA:TRUE cannot be trusted by importing it as a CA; an override for
        # that exact certificate (by SHA-256 fingerprint) is what a user's exception does.
        lines = ["# PSM Certificate Override Settings file",
                 "# This is a generated file!  Do not edit."]
        for host, port, pem_path in self.cert_overrides:
            lines.append(f"{host}:{port}:\tOID.2.16.840.1.101.3.4.2.1\t"
                         f"{sha256_fingerprint(pem_path)}\t")
        with open(os.path.join(self.profile_dir, "cert_override.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def quit(self, timeout: float = 10.0) -> None:
        self.request_quit()
        self.wait(timeout)

    def request_quit(self) -> None:
        """Ask Thunderbird to quit without waiting (several can shut down side by side)."""
        if self.process is None:
            return
        if self.client is None:
            self.kill()  # never connected: nothing to shut down cleanly
        elif self.process.poll() is None:
            try:
                self.client.execute_script(
                    "Services.startup.quit(Ci.nsIAppStartup.eForceQuit);")
            except Exception:
                pass  # the connection closes as Thunderbird goes away
            try:
                self.client.delete_session(send_request=False)
            except Exception:
                pass
        self.client = None

    def wait(self, timeout: float = 10.0) -> None:
        """Wait for the process to end after request_quit(); kill it after `timeout`."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process = None
        self._log.close()

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)

    def remove_profile(self) -> None:
        shutil.rmtree(self.profile_dir, ignore_errors=True)

    def protocol_log(self, last: int = 200) -> str:
        """The last lines of Thunderbird's IMAP/SMTP/POP3 trace (MOZ_LOG writes one file per
        process, named after the given path plus a suffix)."""
        directory, base = os.path.split(self.protocol_log_path)
        lines: list[str] = []
        for name in sorted(os.listdir(directory)):
            if name.startswith(base):
                with open(os.path.join(directory, name), errors="replace") as f:
                    lines += f.read().splitlines()
        return "\n".join(lines[-last:])

    def console_trace(self, last: int = 60) -> str:
        """The last lines of Thunderbird's SMTP and POP3 traces (console output, see prefs)."""
        lines = [line for line in self.log_text().splitlines()
                 if "mailnews.smtp:" in line or re.search(r"console\.\w+: pop3\.", line)]
        return "\n".join(lines[-last:])

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "Thunderbird":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.quit()

    # -- scripting --------------------------------------------------------------------------
    def run(self, body: str, *args: Any, timeout: float = 30.0) -> Any:
        """Run `body` as the body of an async chrome-context function; `args` are `args[0..]`.

        Its return value comes back (JSON-able values); a thrown error or a dialog Thunderbird
        opened meanwhile raises ThunderbirdError with the error and the dialog's text.
        """
        script = (
            "const resolve = arguments[arguments.length - 1];\n"
            "const args = Array.from(arguments).slice(0, -1);\n"
            "const { MailServices } = ChromeUtils.importESModule("
            "'resource:///modules/MailServices.sys.mjs');\n"
            "(async () => {\n" + body + "\n})().then(\n"
            "  v => resolve({ok: v === undefined ? null : v}),\n"
            "  e => resolve({error: String(e) + '\\n' + ((e && e.stack) || '')}));\n"
        )
        try:
            result = self.client.execute_async_script(script, script_args=list(args),
                                                      script_timeout=int(timeout * 1000))
        except Exception as e:
            raise ThunderbirdError(f"{type(e).__name__}: {e}{self._dialog_report()}"
                                   f"{self._trace()}") from None
        dialogs = self._dialog_report()
        if result is None:
            raise ThunderbirdError("script returned nothing (a modal dialog?)" + dialogs
                                   + self._trace())
        if "error" in result:
            raise ThunderbirdError(result["error"] + dialogs + self._trace())
        if dialogs:
            raise ThunderbirdError("Thunderbird showed a dialog" + dialogs + self._trace())
        return result["ok"]

    def _trace(self) -> str:
        return ("\n--- Thunderbird IMAP trace (last lines) ---\n" + self.protocol_log(80)
                + "\n--- Thunderbird SMTP/POP3 trace (last lines) ---\n" + self.console_trace(40))

    def drain_dialogs(self, quiet: float = 1.5, timeout: float = 15.0) -> str:
        """Collect (and close) dialogs until none has come for `quiet` seconds: after a failure
        Thunderbird may show a second one (a failed login, then "Sending of the message
        failed")."""
        collected = ""
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() - last_new < quiet and time.monotonic() < deadline:
            report = self._dialog_report()
            if report:
                collected += report
                last_new = time.monotonic()
            time.sleep(0.2)
        return collected

    def _dialog_report(self) -> str:
        """The texts of the dialogs Thunderbird showed since the last call ("" for none).

        A dialog still open makes Marionette refuse scripts ("Unexpected alert dialog"): then
        its text is read and it is dismissed through WebDriver, and the read is tried again.
        """
        from marionette_driver.marionette import Alert

        extra = []
        for attempt in range(5):
            try:
                texts = self.client.execute_script(
                    "const v = Services.prefs.getStringPref('mailsuite.test.dialogs', '[]');"
                    "Services.prefs.setStringPref('mailsuite.test.dialogs', '[]');"
                    "return JSON.parse(v);")
                break
            except Exception as e:
                if attempt == 4:
                    return f"\n(could not read dialogs: {e})"
                try:
                    alert = Alert(self.client)
                    extra.append(alert.text)
                    alert.dismiss()
                except Exception:
                    time.sleep(0.3)  # the watcher is closing it right now
        seen = list(texts or [])
        seen += [t for t in extra if t and not any(t in s for s in seen)]
        return "".join(f"\ndialog: {t}" for t in seen)

    def screenshot(self, path: str) -> None:
        """PNG of the 3-pane window (chrome context)."""
        handles = self.client.chrome_window_handles
        for handle in handles:
            self.client.switch_to_window(handle)
            if self.client.execute_script(
                    "return document.documentElement.getAttribute('windowtype')") == "mail:3pane":
                break
        data = self.client.screenshot(format="binary")
        with open(path, "wb") as f:
            f.write(data)


# Records the text of every common dialog (prompts, alerts: a failed login, a certificate
# problem) in a pref, and closes the dialog so the run does not hang (docs/design/testing.md).
_DIALOG_WATCHER = r"""
if (!Services.prefs.getBoolPref('mailsuite.test.watcher', false)) {
  Services.prefs.setBoolPref('mailsuite.test.watcher', true);
  const record = (text) => {
    const list = JSON.parse(Services.prefs.getStringPref('mailsuite.test.dialogs', '[]'));
    list.push(text);
    Services.prefs.setStringPref('mailsuite.test.dialogs', JSON.stringify(list));
  };
  Services.obs.addObserver({
    observe(subject, topic) {
      try {
        const doc = subject.ownerDocument || subject.document;
        const text = [doc.getElementById('infoTitle'), doc.getElementById('infoBody')]
          .filter(e => e && e.textContent).map(e => e.textContent.trim()).join(': ');
        record(text || doc.documentURI);
        const win = doc.defaultView;
        win.setTimeout(() => { try { doc.querySelector('dialog')?.cancelDialog(); } catch (e) {}
                               try { win.close(); } catch (e) {} }, 0);
      } catch (e) { record('unreadable dialog: ' + e); }
    }
  }, 'common-dialog-loaded');
  Services.ww.registerNotification({
    observe(subject, topic) {
      if (topic != 'domwindowopened') return;
      subject.addEventListener('load', () => {
        const url = subject.document.documentURI;
        if (url.includes('commonDialog') || url.includes('about:blank')) return;
        if (url.includes('messenger.xhtml')) return;
        record('window opened: ' + url + ' ' + (subject.document.title || ''));
      }, { once: true });
    }
  });
}
return true;
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_fingerprint(pem_path: str) -> str:
    """AA:BB:... of the first certificate in a PEM file (the form cert_override.txt uses)."""
    import hashlib
    import ssl as _ssl

    with open(pem_path) as f:
        der = _ssl.PEM_cert_to_DER_cert(f.read())
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
