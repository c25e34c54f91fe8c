"""Server settings: what the HTTP layer needs beyond the engine's own ``EngineConfig``.
Filled from the command line (``server.cli``, which builds the flags from these fields);
frozen once the server starts."""

from __future__ import annotations

from dataclasses import dataclass

from itt_runtime.config import option
from server.connections import HTTP_IMPLEMENTATIONS, httptools_installed


@dataclass(frozen=True)
class ServerSettings:
    served_model_names: tuple[str, ...] = option(
        ("default",), "name(s) clients use in 'model'; the first labels the metrics",
        flag="--served-model-name", default_text="the --model argument")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on", "port")
    api_key: str | None = option(
        None, "require 'Authorization: Bearer KEY' on /v1/..., /tokenize and /detokenize",
        default_text="$ITT_API_KEY")
    max_queue_len: int | None = option(
        None, "429 when admitting a request would leave more sequences than this waiting",
        "non_negative_int", default_text="unbounded")
    max_request_bytes: int = option(8 * 2**20, "larger request bodies get 413", "bytes",
                                    default_text="8MiB")
    drain_timeout: float = option(
        30.0, "seconds in-flight requests get after SIGTERM; then streams end with a "
        "server_shutdown error chunk, other requests with 503", "seconds")
    timeout_keep_alive: float = option(5.0, "seconds an idle keep-alive connection stays "
                                       "open", "seconds")
    timeout_request_header: float = option(
        10.0, "seconds a connection has to send complete request headers once it is ready "
        "for a request; slower ones (slowloris) are closed", "seconds")
    max_connections: int = option(1024, "open connections beyond this get 503 and are "
                                  "closed", "positive_int")
    http: str = option(
        "auto", "HTTP/1.1 implementation, as uvicorn's --http: httptools (C parser) or h11 "
        "(pure Python); auto is httptools when installed", choices=HTTP_IMPLEMENTATIONS)
    chat_template: str | None = option(
        None, "a file with a Jinja chat template to use instead of the model's own (see "
        "'Chat templates')", default_text="the model's (tokenizer_config.json)")
    enable_auto_tool_choice: bool = option(
        False, "let requests with tools leave tool_choice 'auto' (the default): calls are "
        "read from the generated text by --tool-call-parser", "bool")
    tool_call_parser: str | None = option(
        None, "how 'auto' reads tool calls from the text: hermes (Hermes, Qwen 2.5/3, and "
        "models whose template has no tool format) or llama3_json (Llama 3.x's JSON calls); "
        "see 'Tool calling'", choices=("hermes", "llama3_json"), default_text="none")
    log_level: str = option("info", "log level",
                            choices=("critical", "error", "warning", "info", "debug"))

    @property
    def auto_tool_parser(self) -> str | None:
        """The parser for tool_choice 'auto', or None where 'auto' is refused."""
        return self.tool_call_parser if self.enable_auto_tool_choice else None

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("served model names must be non-empty")
        if self.max_queue_len is not None and self.max_queue_len < 0:
            raise ValueError(f"max_queue_len must be >= 0, got {self.max_queue_len}")
        if self.max_request_bytes < 1:
            raise ValueError("max_request_bytes must be positive")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.timeout_request_header <= 0 or self.timeout_keep_alive < 0:
            raise ValueError("connection timeouts must be positive")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        if self.http == "httptools" and not httptools_installed():
            raise ValueError("--http httptools: httptools is not installed "
                             "(pip install httptools)")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
