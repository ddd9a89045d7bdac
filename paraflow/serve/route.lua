-- paraflow's route by size (HAProxy Lua, loaded by the config paraflow/serve/haproxy.py writes):
-- sets txn.pixels to width × height of the JSON body's "size": "WxH" (0 without one), so the
-- frontend can send large images to the rank-group instances. The body is buffered
-- (option http-buffer-request); the instance still checks the request in full.
core.register_action("paraflow_pixels", { "http-req" }, function(txn)
    local body = txn.sf:req_body() or ""
    local w, h = string.match(body, '"size"%s*:%s*"(%d+)x(%d+)"')
    local pixels = 0
    if w and h then
        pixels = tonumber(w) * tonumber(h)
    end
    txn:set_var("txn.pixels", pixels)
end)
