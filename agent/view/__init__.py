"""The read-only FUSE view: node admins browse each quota scope with the catalogue's figures beside the files.

``storage-agent view`` is a separate trio process (pyfuse3 needs trio) so that a
hung or crashed FUSE mount can never stall the asyncio API process; ``serve``
only spawns and supervises it (:mod:`agent.engine.view_supervisor`) and never touches
the mount on a request path.

Layout of the mount (one FUSE filesystem at ``[view] mount-root``; pyfuse3 runs
one FUSE session per process, and a process per quota scope would not be cheap
on nodes with thousands of scopes)::

    <mount-root>/<volume>/<qsid>/.usage          JSON figures from the catalogue
    <mount-root>/<volume>/<qsid>/<dashed-uuid>/  the vfolder, read-only, xattrs user.storage_agent.*
"""
