"""A custom resolver for examples/routing/custom.yaml: routes by the domain of the user's e-mail.

`operation` is the flow's route class (session, api, upload, download, eventsource, websocket,
rest, jmap_other, other): routing happens when the request head arrives, before the body is read,
so JMAP method names are not known yet. Return a URL, a list of URLs (primary first), or None
(403 "no mail server"). Raising a ProxyError answers the client with it; any other exception is a 503.
"""

SERVERS = {
    "example.com": "https://127.0.0.1:18443",
    "globex.example": "https://127.0.0.1:28443",
}


class ByDomain:
    async def resolve_server(self, identity, operation):
        domain = identity.login.rpartition("@")[2].lower()
        return SERVERS.get(domain)


resolver = ByDomain
