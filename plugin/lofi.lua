-- :Lofi. Loading this file requires nothing else; the plugin loads on first use.
if vim.fn.exists(":Lofi") == 2 then
  return
end

vim.api.nvim_create_user_command("Lofi", function(cmd)
  require("lofi.commands").command(cmd.args)
end, {
  nargs = "*",
  desc = "lofi: generate music (:Lofi {prompt} [duration]) or run a subcommand",
  complete = function(arglead, cmdline, cursorpos)
    return require("lofi.commands").complete(arglead, cmdline, cursorpos)
  end,
})
