"""The agent's L7 front end: TLS termination behind the Regional Services guard."""
