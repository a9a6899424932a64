"""The one entry point of sender authentication at the end of DATA (worker thread).

docs/design/trust-authentication.md, "What the gate gets". SPF was checked earlier (at MAIL,
`spf.check_spf`); here DKIM, ARC and DMARC run on the message, and the DMARC outcome with the
[trust] settings gives the disposition.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mailsuite.config import TrustSection
from mailsuite.smtp.replies import Reply
from mailsuite.trust import ACCEPT, JUNK, REJECT, TEMPFAIL, AuthResult, Envelope, Verdict
from mailsuite.trust.dkimcheck import dkim_dnsfunc, verify_arc, verify_dkim
from mailsuite.trust.dmarc import DmarcOutcome, evaluate_message
from mailsuite.trust.dns import DnsTempError

Lookup = Callable[[str, str, float], list]

DMARC_TEMPFAIL = Reply(451, "4.7.0",
                       "temporary DNS failure checking sender authentication, try again later",
                       reason="dmarc")
_ACTIONS = {"reject": REJECT, "quarantine": JUNK, "none": ACCEPT}


@dataclass
class AuthOutcome:
    """results: spf, every dkim, arc, dmarc (in that order), for Authentication-Results.
    disposition: ACCEPT/JUNK/TEMPFAIL/REJECT. reply: for TEMPFAIL/REJECT. log: one line."""

    results: list[AuthResult] = field(default_factory=list)
    disposition: str = ACCEPT
    reply: Reply | None = None
    log: str = ""
    dmarc: DmarcOutcome | None = None

    def verdict(self) -> Verdict:
        return Verdict(self.disposition, self.reply, [], list(self.results), self.log)


def dmarc_reject_reply(domain: str, spf: str, dkim: str) -> Reply:
    return Reply(550, "5.7.1",
                 f"message refused: DMARC policy of {domain} says reject (SPF {spf}, DKIM {dkim})",
                 reason="dmarc")


def authenticate_message(message: bytes, envelope: Envelope, spf: AuthResult | None,
                         dnsfunc_blocking: Lookup, config: TrustSection, rng: Any) -> AuthOutcome:
    """DKIM, ARC and DMARC for `message` (blocking: call it through a worker pool). Never raises.

    dnsfunc_blocking: `DnsClient.blocking(reactor)`. Each of DKIM, ARC and DMARC gets
    config.dns_timeout seconds for all its DNS questions; past that its questions fail as
    temporary errors. rng: a random.Random for DMARC pct sampling."""
    if not config.enabled:
        return AuthOutcome(log="sender authentication disabled ([trust] enabled = false)")
    if spf is None:  # the gate did not check SPF: DMARC can only align DKIM
        spf = AuthResult("spf", "none", "not checked",
                         (("smtp.mailfrom", envelope.mail_from),) if envelope.mail_from
                         else (("smtp.helo", envelope.helo),))
    timeout = float(config.dns_timeout)
    try:
        dkim_results = verify_dkim(message, dkim_dnsfunc(_budget(dnsfunc_blocking, timeout),
                                                         timeout))
    except Exception as e:  # verify_dkim does not raise; this is the last line of defence
        dkim_results = [AuthResult("dkim", "permerror", f"verification failed: {type(e).__name__}")]
    try:
        arc = verify_arc(message, dkim_dnsfunc(_budget(dnsfunc_blocking, timeout), timeout))
    except Exception as e:
        arc = AuthResult("arc", "fail", f"verification failed: {type(e).__name__}")
    try:
        dmarc = evaluate_message(message, spf, dkim_results, _budget(dnsfunc_blocking, timeout),
                                 rng, timeout)
    except Exception as e:
        dmarc = DmarcOutcome(AuthResult("dmarc", "permerror", f"failed: {type(e).__name__}"))
    results = [spf, *dkim_results, arc, dmarc.result]
    disposition, reply = _disposition(dmarc, spf, dkim_results, config)
    return AuthOutcome(results, disposition, reply,
                       _log(envelope, spf, dkim_results, arc, dmarc, disposition), dmarc)


def _disposition(dmarc: DmarcOutcome, spf: AuthResult, dkim: list[AuthResult],
                 config: TrustSection) -> tuple[str, Reply | None]:
    if dmarc.keyword == "temperror":
        return TEMPFAIL, DMARC_TEMPFAIL
    if dmarc.keyword != "fail":
        return ACCEPT, None
    setting = {"reject": config.dmarc_reject, "quarantine": config.dmarc_quarantine}.get(
        dmarc.policy, "none")
    disposition = _ACTIONS.get(str(setting).strip().lower(), _ACTIONS.get(dmarc.policy, ACCEPT))
    if disposition == REJECT:
        return REJECT, dmarc_reject_reply(dmarc.domain, spf.result, _dkim_summary(dkim))
    return disposition, None


def _dkim_summary(dkim: list[AuthResult]) -> str:
    """One word for the reply: pass if any signature passed (even unaligned), else the first
    signature's result."""
    if any(r.result == "pass" for r in dkim):
        return "pass"
    return dkim[0].result if dkim else "none"


def _log(envelope: Envelope, spf: AuthResult, dkim: list[AuthResult], arc: AuthResult,
         dmarc: DmarcOutcome, disposition: str) -> str:
    parts = [f"dmarc={dmarc.keyword}"]
    if dmarc.domains:
        parts.append("from=" + ",".join(dmarc.domains))
    if dmarc.requested:
        applied = dmarc.policy + (" (pct sampled out)" if dmarc.sampled_out else "")
        parts.append(f"policy={dmarc.requested} applied={applied}")
    parts.append(f"spf={spf.result}")
    parts.append("dkim=" + ",".join(
        r.result + (f"({dict(r.properties).get('header.d')})"
                    if dict(r.properties).get("header.d") else "") for r in dkim))
    parts.append(f"arc={arc.result}")
    parts.append(f"-> {disposition}")
    if envelope.queue_id:
        parts.insert(0, envelope.queue_id + ":")
    line = " ".join(parts)
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in line)[:500]


def _budget(lookup: Lookup, seconds: float) -> Lookup:
    """`lookup` limited to `seconds` in all, from now: each question gets what is left."""
    deadline = time.monotonic() + seconds

    def limited(name: str, qtype: str, timeout: float) -> list:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DnsTempError("the DNS time of this check is spent")
        return lookup(name, qtype, min(timeout, remaining) if timeout else remaining)

    return limited
