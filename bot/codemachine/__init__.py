"""CodeMachine workspaces imported as protocols.

`parser` reads the workspace's JS config files (pure), `mapping` turns a parsed workspace into a
ProtocolSpec and its protocol files (pure), `importer` does the I/O: reading a directory,
persisting the run, enqueuing the job that writes its branch.
"""
