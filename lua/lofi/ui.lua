-- Progress and results, unobtrusively: a statusline component, a notification when a track is
-- done or failed, fidget.nvim progress when it is installed. Jobs are kept apart by track_id.
local config = require("lofi.config")

local M = {}

local S = {
  jobs = {}, -- track_id -> {prompt, status, percent, stage, step, total_steps, eta_sec, fidget}
  order = {}, -- track_ids in the order they were queued
  download = nil, -- last download_progress params while a setup runs
  playing = nil, -- {path, label}
  radio = nil, -- {state, track_id, index, prompt, reason} while the radio is on
  mine = {}, -- track_id -> true: generations this client asked for (the others are the radio's)
}

local function notify(msg, level)
  if config.options.ui.notify then
    vim.notify(msg, level or vim.log.levels.INFO, { title = "lofi" })
  end
end

local function fidget_progress()
  if not config.options.ui.fidget then
    return nil
  end
  local ok, progress = pcall(require, "fidget.progress")
  if ok and type(progress) == "table" and progress.handle then
    return progress
  end
  return nil
end

local function short(s, n)
  s = tostring(s or "")
  if vim.fn.strchars(s) > n then
    return vim.fn.strcharpart(s, 0, n - 1) .. "…"
  end
  return s
end

local function refresh()
  pcall(vim.api.nvim_exec_autocmds, "User", { pattern = "LofiStatus", modeline = false })
  pcall(vim.cmd.redrawstatus)
end

local function drop(track_id)
  local job = S.jobs[track_id]
  S.jobs[track_id] = nil
  for i, id in ipairs(S.order) do
    if id == track_id then
      table.remove(S.order, i)
      break
    end
  end
  return job
end

local function job_for(track_id, prompt)
  local job = S.jobs[track_id]
  if not job then
    job = { prompt = prompt, status = "queued", percent = 0 }
    S.jobs[track_id] = job
    S.order[#S.order + 1] = track_id
    local progress = fidget_progress()
    if progress then
      local ok, handle = pcall(progress.handle.create, {
        title = "lofi " .. short(track_id, 8),
        message = short(prompt or "queued", 40),
        lsp_client = { name = "lofi" },
        percentage = 0,
      })
      job.fidget = ok and handle or nil
    end
  end
  return job
end

local function fidget_report(job, message)
  if job.fidget then
    pcall(job.fidget.report, job.fidget, { message = message, percentage = job.percent })
  end
end

local function fidget_end(job, how)
  if job and job.fidget then
    pcall(job.fidget[how] or job.fidget.finish, job.fidget)
    job.fidget = nil
  end
end

--- A generate request was answered (queued/generating); cached answers are not tracked.
function M.queued(track_id, prompt, status)
  S.mine[track_id] = true
  local job = job_for(track_id, prompt)
  job.status = status == "generating" and "generating" or "queued"
  refresh()
end

--- Feed every daemon event here.
function M.on_event(name, d)
  d = d or {}
  if name == "generation_start" then
    local job = job_for(d.track_id, d.prompt)
    job.status = "generating"
    job.radio = S.radio ~= nil and not S.mine[d.track_id]
    job.prompt = job.prompt or d.prompt
    fidget_report(job, "started")
  elseif name == "generation_progress" then
    local job = job_for(d.track_id)
    job.status = "generating"
    job.percent = math.max(job.percent or 0, tonumber(d.percent) or 0)
    job.stage, job.step, job.total_steps, job.eta_sec = d.stage, d.step, d.total_steps, d.eta_sec
    local msg = d.stage or "generating"
    if d.step and d.total_steps then
      msg = ("%s %d/%d"):format(msg, d.step, d.total_steps)
    end
    fidget_report(job, msg)
  elseif name == "generation_complete" then
    local job = drop(d.track_id)
    S.mine[d.track_id] = nil
    fidget_end(job, "finish")
    if job and job.radio then
      return refresh() -- the radio announces its tracks when they start to sound
    end
    notify(
      ("track ready (%.0f s): %s"):format(tonumber(d.duration_sec) or 0, d.path or "?"),
      vim.log.levels.INFO
    )
  elseif name == "generation_error" then
    local job = drop(d.track_id)
    fidget_end(job, "cancel")
    notify(("generation failed [%s]: %s"):format(d.code or "ERROR", d.message or ""), vim.log.levels.ERROR)
  elseif name == "generation_cancelled" then
    local job = drop(d.track_id)
    S.mine[d.track_id] = nil
    fidget_end(job, "cancel")
    if job and job.radio then
      return refresh() -- the radio's prefetch, cancelled by radio stop
    end
    notify("generation cancelled" .. (d.at_step and (" at step " .. d.at_step) or ""), vim.log.levels.INFO)
  elseif name == "download_progress" then
    S.download = d
    local pct = tonumber(d.overall_percent) or 0
    if pct >= 100 then
      S.download = nil
    end
  elseif name == "setup_complete" or name == "setup_error" then
    S.download = nil
  elseif name == "playback_started" then
    S.playing = { path = d.path, label = d.prompt or vim.fn.fnamemodify(d.path or "", ":t:r") }
  elseif name == "radio_track" then
    S.radio = vim.tbl_extend("force", S.radio or {}, {
      track_id = d.track_id,
      index = d.index,
      prompt = d.prompt,
      path = d.path,
      state = "playing", -- sent as the track starts to sound, just before radio_state
    })
    S.radio.reason = nil
  elseif name == "radio_state" then
    if d.state == "stopped" then
      S.radio = nil
    else
      S.radio = vim.tbl_extend("force", S.radio or {}, { state = d.state, reason = d.reason })
    end
  elseif name == "playback_ended" then
    if not S.playing or S.playing.path == d.path then
      S.playing = nil
    end
  elseif name == "daemon_exit" then
    for _, id in ipairs(vim.deepcopy(S.order)) do
      fidget_end(drop(id), "cancel")
    end
    S.download, S.playing, S.radio = nil, nil, nil
    if not d.expected then
      notify(
        ("daemon exited unexpectedly (%s); log: %s"):format(
          d.signal ~= 0 and ("signal " .. d.signal) or ("code " .. tostring(d.code)),
          vim.fs.joinpath(config.home(), "logs", "daemon.log")
        ),
        vim.log.levels.WARN
      )
    end
  end
  refresh()
end

--- Something went wrong outside any one job (daemon missing, keeps crashing, bad line).
function M.error(msg)
  notify(msg, vim.log.levels.ERROR)
end

--- Statusline component: "" when idle.
function M.statusline()
  local icon = config.options.ui.icon
  local running, queued, radio_job = nil, 0, nil
  for _, id in ipairs(S.order) do
    local job = S.jobs[id]
    if job.radio then
      radio_job = job
    elseif job.status == "generating" and not running then
      running = job
    else
      queued = queued + 1
    end
  end
  local parts = {}
  if running then
    local s = ("%s %d%%"):format(icon, math.floor(running.percent or 0))
    if running.eta_sec and running.eta_sec > 0 then
      s = s .. (" ~%ds"):format(math.ceil(running.eta_sec))
    end
    parts[#parts + 1] = s
    if queued > 0 then
      parts[#parts + 1] = ("+%d"):format(queued)
    end
  elseif queued > 0 then
    parts[#parts + 1] = ("%s queued %d"):format(icon, queued)
  end
  if S.download then
    parts[#parts + 1] = ("%s setup %d%%"):format(icon, math.floor(tonumber(S.download.overall_percent) or 0))
  end
  if S.radio then
    local r = S.radio
    local s = ("%s radio"):format(icon)
    if r.state == "waiting" then
      s = s .. " waiting"
    elseif r.prompt then
      s = s .. " ▶ " .. short(r.prompt, 24)
    end
    if radio_job and radio_job.status == "generating" then
      s = s .. (" (next %d%%)"):format(math.floor(radio_job.percent or 0))
    end
    parts[#parts + 1] = s
  elseif S.playing and not running then
    parts[#parts + 1] = ("%s ▶ %s"):format(icon, short(S.playing.label, 24))
  end
  return table.concat(parts, " ")
end

--- Snapshot for tests and :Lofi status.
function M.state()
  local jobs = {}
  for _, id in ipairs(S.order) do
    local j = S.jobs[id]
    jobs[#jobs + 1] = {
      track_id = id,
      prompt = j.prompt,
      status = j.status,
      percent = j.percent,
      stage = j.stage,
      step = j.step,
      total_steps = j.total_steps,
      eta_sec = j.eta_sec,
      fidget = j.fidget ~= nil,
      radio = j.radio or false,
    }
  end
  return { jobs = jobs, download = S.download, playing = S.playing, radio = S.radio }
end

return M
