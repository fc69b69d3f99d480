"""The ``fleetline`` command line: starts each service, runs migrations, manages API keys
and devices over the REST API, and runs the whole system locally (``fleetline up``)."""
