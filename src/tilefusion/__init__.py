"""tilefusion: fuse tiled 3D light-sheet acquisitions into one OME-Zarr volume."""

__version__ = "0.1.0"
