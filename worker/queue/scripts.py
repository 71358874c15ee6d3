"""The Lua scripts a stream's consumer runs: a batch's Redis commands in one round trip.

Each takes a whole batch's ids (or rows) as one joined string, not an argument per id:
redis-py packs every argument in Python, so one argument instead of hundreds is most of the
saving, and one round trip instead of several. Lua's unpack() is limited in size, hence the
slices. They are kept apart from :mod:`worker.queue.stream`, which registers and calls them,
so that the Python there reads in one sitting.
"""

# KEYS: stream. ARGV: rows "token\temail\n..." (validated: no tab or newline inside).
ENQUEUE = r"""
local n = 0
for token, email in string.gmatch(ARGV[1], '([^\t\n]*)\t([^\n]*)\n') do
  redis.call('XADD', KEYS[1], '*', 'token', token, 'email', email)
  n = n + 1
end
return n
"""

# KEYS: this period's hash, the previous period's. ARGV: hash lifetime in seconds,
# "id\ttoken\temail\n..." (validated; email lower-cased). Returns the ids whose pair another
# message holds.
HOLD = r"""
local taken = {}
for id, pair in string.gmatch(ARGV[2], '([^\t\n]+)\t([^\n]*)\n') do
  local holder = redis.call('HGET', KEYS[2], pair)
  if not holder or holder == id then
    holder = id
    if redis.call('HSETNX', KEYS[1], pair, id) == 0 then
      holder = redis.call('HGET', KEYS[1], pair)
    end
  end
  if holder ~= id then taken[#taken + 1] = id end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return taken
"""


# A Lua function for the scripts that act under a consumer name's lease (see
# worker.queue.lease): whether the key holds ``token`` ("TOKEN RENEWED_MS").
HOLDS_NAME = r"""
local function holds(key, token)
  local value = redis.call('GET', key)
  return value and string.sub(value, 1, #token + 1) == token .. ' '
end
"""

# KEYS: intents hash, stream, the consumer name's lease. ARGV: "id,id,...", send time,
# group, consumer, the lease's token. Once another process has taken over the name,
# nothing is recorded and "l:" alone is returned. Else records the intents of the
# messages still pending for this consumer, and returns the others: "c:ID" for one
# another worker holds, or settled (its entry still in the stream), never to be sent
# here; "t:ID" for one whose entry was deleted (trimmed) meanwhile, pending for nobody
# else or claimed without its fields: whether a worker that claimed it before the trim
# sent it cannot be told, so it is not sent here either, but recorded failed (and
# dead-lettered with its pair, which a worker that claimed it afterwards never learns).
INTENTS = (
    HOLDS_NAME
    + """
if not holds(KEYS[3], ARGV[5]) then return {'l:'} end
local fields = {}
local others = {}
for id in string.gmatch(ARGV[1], '[^,]+') do
  local entry = redis.call('XPENDING', KEYS[2], ARGV[3], id, id, 1)[1]
  if entry and entry[2] == ARGV[4] then
    fields[#fields + 1] = id
    fields[#fields + 1] = ARGV[2]
  elseif redis.call('XRANGE', KEYS[2], id, id)[1] then
    others[#others + 1] = 'c:' .. id
  else
    others[#others + 1] = 't:' .. id
  end
end
for i = 1, #fields, 1000 do
  redis.call('HSET', KEYS[1], unpack(fields, i, math.min(i + 999, #fields)))
end
return others
"""
)

# KEYS: intents hash. ARGV: "id,id,...", the value they were recorded with. Only intents
# still holding that value go: a later request for the same messages wrote its own.
DROP_INTENTS = """
local dropped = 0
for id in string.gmatch(ARGV[1], '[^,]+') do
  if redis.call('HGET', KEYS[1], id) == ARGV[2] then
    dropped = dropped + redis.call('HDEL', KEYS[1], id)
  end
end
return dropped
"""

# KEYS: stream, intents hash. ARGV: group, "id,id,...".
ACK = """
local ids = {}
for id in string.gmatch(ARGV[2], '[^,]+') do ids[#ids + 1] = id end
for i = 1, #ids, 1000 do
  local slice = {unpack(ids, i, math.min(i + 999, #ids))}
  redis.call('XACK', KEYS[1], ARGV[1], unpack(slice))
  redis.call('HDEL', KEYS[2], unpack(slice))
end
return #ids
"""

# KEYS: stream, intents hash, dead-letter stream, this period's hash of held pairs, the
# previous period's. ARGV: group, "id,id,..." (every id to acknowledge), the dead messages'
# "id\ttoken\temail\n..." (email lower-cased), their fields as a JSON list of flat
# [name, value, ...] lists. A flush that dead-letters, in one script rather than a MULTI:
# a user refused MULTI would run the commands one by one, acknowledging messages whose
# copy was refused. The copies are made first, so any refusal comes before anything is
# acknowledged (by ACK's own lines, which read the same keys and arguments). Each dead
# message lets go of its pair where it holds it, and only there: a pair another message
# holds (a copy requeued meanwhile) stays held.
DEAD_LETTER = (
    r"""
for _, fields in ipairs(cjson.decode(ARGV[4])) do
  redis.call('XADD', KEYS[3], '*', unpack(fields))
end
for id, pair in string.gmatch(ARGV[3], '([^\t\n]+)\t([^\n]*)\n') do
  for _, key in ipairs({KEYS[4], KEYS[5]}) do
    if redis.call('HGET', key, pair) == id then redis.call('HDEL', key, pair) end
  end
end"""
    + ACK
)
