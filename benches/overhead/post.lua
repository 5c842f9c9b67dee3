-- wrk script of the overhead benchmark (the issue's reference wrk script): a short chat completion.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"bench-model","messages":[{"role":"user","content":"What is the capital of France? Answer briefly."}],"max_tokens":16}'
