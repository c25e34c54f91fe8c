"""HTTP routes: each parses its body, calls one handler, returns its response."""

from server.routes import chat, completions, misc, tokenize

routers = [completions.router, chat.router, misc.router, tokenize.router]
