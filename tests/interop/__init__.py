"""Interop suite: vfioproxy against real vfio-user peers (libvfio-user, QEMU); see README."""
