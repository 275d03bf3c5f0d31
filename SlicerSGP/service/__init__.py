"""The engine as a service: `sgp serve` (server.py, jobs.py), its HTTP client (client.py) and the
launcher that runs a local server for the Slicer module (launcher.py).

client.py, launcher.py and protocol.py (with archive.py, npy.py and request_checks.py) use only
the standard library and numpy (they run inside Slicer); server.py, jobs.py and store.py may
import the engine (torch) and fastapi/uvicorn.
"""
