-- POST /jmap with a small JMAP request (RFC 8621 Mailbox/get on the user's primary mail account "b",
-- the account the bench upstream's session names). The Authorization header comes from wrk's -H.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
wrk.body = '{"using":["urn:ietf:params:jmap:core","urn:ietf:params:jmap:mail"],'
        .. '"methodCalls":[["Mailbox/get",{"accountId":"b","ids":null},"c0"]]}'
