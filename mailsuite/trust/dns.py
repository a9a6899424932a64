"""The one DNS client of the process: every trust check asks it (docs/design/trust.md, "DNS").

INTERFACE (implemented by the trust-auth work; other modules rely on exactly this):

    class DnsTempError(Exception)       # timeout, SERVFAIL, REFUSED, malformed answer
    class DnsClient:
        def __init__(self, resolver, clock, max_entries: int = 20000): ...
        def query(self, name: str, qtype: str) -> Deferred
            # qtype in "A", "AAAA", "TXT", "MX", "PTR". Fires with a list:
            #   A/AAAA -> list[str] addresses; TXT -> list[bytes] (each record's strings
            #   joined); MX -> list[tuple[int, str]]; PTR -> list[str].
            # NXDOMAIN and NODATA fire with [] (cached for the SOA minimum, at most 1 hour,
            # 60 s when there is no SOA); DnsTempError on timeout/SERVFAIL (not cached).
            # Positive answers are cached for their smallest TTL (at most 1 day).
        def blocking(self, reactor) -> Callable[[str, str, float], list]
            # For libraries running in a worker thread (pyspf, dkimpy): the same query,
            # waited for from the thread (never call it on the reactor thread).
"""
