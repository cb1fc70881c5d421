"""The authorisation pipeline (授权流水线): one module per participant and the chain runner.

de-duplicate → terminal binding → card status → eligibility date → program (card) →
provider → service category → cryptogram → card counter → balance → post (the
group-commit writer, :mod:`clearing.ledger`) → answer (:mod:`clearing.service`).
"""
