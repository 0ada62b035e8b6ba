"""The CA's domain: profiles, CSR policy, issuance, revocation, CRL and OCSP building, storage."""
