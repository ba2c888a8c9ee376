"""Running it for a person: experiments, background jobs, exports, named plans, the CLI, its commands and printed reports. The top floor: imports anything below, nothing imports it."""
