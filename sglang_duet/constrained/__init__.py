"""Structured output: grammars (JSON schema, regex, EBNF) compiled by xgrammar, one matcher per request."""
