"""recorder: the vfioproxy trace format (writer, reader, tools)."""
