"""Secrets in locations: what is redacted before a URL is written anywhere or logged.

A cache or dataset location may carry credentials: a signed or SAS URL's query string
(`https://host/prefix?sv=...&sig=...`), or `user:password@` in the authority. The tool needs them
to make requests, but nothing it writes (manifests, identity, train_config.json, checkpoints, model
cards, tracker configs) or logs may contain them: those files are shared, uploaded to the hub, and
pasted into issues. `redact` keeps what identifies the location (scheme, host, path, and the
query's parameter names) and replaces every secret by "REDACTED".
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "REDACTED"


def redact(location: str | None) -> str | None:
    """`location` with query values and any password replaced by REDACTED; other strings (local
    paths, hub ids, URLs without secrets) unchanged."""
    if not location or "://" not in location:
        return location
    try:
        parts = urlsplit(location)
    except ValueError:
        return location
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{host}" if ":" in userinfo else f"{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED) for k, _ in pairs], safe=REDACTED) if pairs else REDACTED
    if netloc == parts.netloc and query == parts.query:
        return location  # nothing secret: as given (urlunsplit would respell "s3://" as "s3:")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


__all__ = ["REDACTED", "redact"]
