"""EST (RFC 7030) over HTTPS: wire formats here, endpoints in the blueprint."""
