"""The sweep service (``lorasweep serve``): a REST API over the orchestrator library with tenants,
hashed tokens and monthly dollar quotas; sweeps queued and run by supervised driver processes
apart from the API. Imports no torch."""
