"""`kold sim`: a discrete-event simulation of functions scaling under a pre-warm policy.

It runs the live system's own pieces (scaling.decide, the Policy objects, DemandHistory), not copies,
so a policy's simulated cold starts and idle cost are what the platform would do on the same arrivals.
"""
