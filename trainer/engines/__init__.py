"""The engines: the client of SGLang's native API (our CPU engine speaks the same), the launcher of engine
servers, and weight sync (disk or a process group). Imports no other part of the trainer."""
