"""A client of the admin dashboard over HTTPS, for scenario and interop tests: it logs in like a
browser (the login form's token and cookie, then the session cookie) and sends every POST with
the session's CSRF token, trusting only the server's own certificate."""
from __future__ import annotations

import http.client
import re
import ssl
from dataclasses import dataclass
from urllib.parse import urlencode

from mailsuite.directory.admins import AdminStore, hash_new_password

ADMIN, ADMIN_PASSWORD = "root", "admin-pw-1"


def add_admin(server, name: str = ADMIN, password: str = ADMIN_PASSWORD) -> None:
    """Seed a dashboard admin in the server's database (as MailServer.add_user does users)."""
    store = server.directory()
    try:
        AdminStore(store).add(name, hash_new_password(password))
    finally:
        store.close()


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: str


class AdminClient:
    def __init__(self, server):
        self.port = server.ports["admin"]
        self.host = server.host
        self.context = ssl.create_default_context(cafile=server.cafile)
        self.context.check_hostname = False  # the certificate names the server's host name
        self.cookie = ""

    def request(self, method: str, path: str, fields: dict[str, str] | None = None,
                cookie: str | None = None) -> Answer:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                           timeout=30)
        headers = {}
        cookie = self.cookie if cookie is None else cookie
        if cookie:
            headers["Cookie"] = cookie
        body = None
        if fields is not None:
            body = urlencode(fields)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return Answer(response.status, response.msg, response.read().decode("utf-8"))
        finally:
            conn.close()

    def login(self, name: str = ADMIN, password: str = ADMIN_PASSWORD) -> Answer:
        form = self.request("GET", "/login", cookie="")
        login_cookie = form.headers.get_all("Set-Cookie")[0].split(";")[0]
        answer = self.request("POST", "/login", {"csrf": csrf_of(form.body), "name": name,
                                                 "password": password}, cookie=login_cookie)
        if answer.status == 303:
            self.cookie = answer.headers.get_all("Set-Cookie")[0].split(";")[0]
        return answer

    def get(self, path: str) -> Answer:
        return self.request("GET", path)

    def post(self, path: str, fields: dict[str, str] | None = None) -> Answer:
        token = csrf_of(self.get("/overview").body)
        return self.request("POST", path, {"csrf": token, **(fields or {})})


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, f"no CSRF token in {page[:300]!r}"
    return found.group(1)


def notice(page: str) -> str:
    found = re.search(r'class="notice"[^>]*>([^<]*)<', page)
    return found.group(1) if found else ""
