"""Trust: the trust store value, certificate path validation at a given moment, agency binding.

The pure part takes certificates, CRLs and OCSP responses as values; ``keys.files`` is the thin
edge that reads them from disk.
"""
