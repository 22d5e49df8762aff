"""The agent's metrics: aggregated counters only, served to Prometheus over mTLS.

    registry.py   a registry that refuses any metric whose labels are not on
                  the allowlist (no client IP, URL, user agent or hostname
                  can become a label)
    l7.py         the L7 front end's counters (agent/l7/counters.py)
    server.py     /metrics over HTTPS, client certificate required; reload()
                  picks up reissued certificates (the daemon calls it on SIGHUP)
"""
