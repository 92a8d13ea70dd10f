/* The operator view (admin keys): system_details (workers, device and memory, loaded models,
   queue depth and oldest wait), the queue with cancel buttons, clear_queue, recent failures and
   the count of webhook dead letters. Every call is an admin endpoint: other keys get 403. */
'use strict';

(() => {
  const {el} = FS;
  const $ = (id) => document.getElementById(id);
  let adminServer = null;
  let timer = null;

  function size(bytes) {
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
  }
  // "Flux2KleinPipeline:/data/tiny-models/flux2-klein" -> "Flux2KleinPipeline · flux2-klein"
  const pipeline = (name) => name.replace(/:(.*[\/\\])?([^\/\\]+)$/, ' · $2');
  function show(name, value) {
    if (value === null || value === undefined) return '–';
    if (typeof value === 'number' && /bytes|memory|free|total|used|allocated|reserved/i.test(name)) return size(value);
    if (typeof value === 'object') return JSON.stringify(value);
    return String(value);
  }
  function kv(target, object) {
    target.replaceChildren(...Object.entries(object || {}).flatMap(([name, value]) => [
      el('dt', {}, name), el('dd', {}, show(name, value))]));
  }
  const seconds = (value) => (value === null || value === undefined ? '–' : `${Number(value).toFixed(1)} s`);

  function refuse(message) {
    const banner = $('refused');
    banner.hidden = !message;
    banner.textContent = message || '';
  }

  async function server() {
    if (!adminServer) {
      const catalog = await FS.api('/api/fluxserve/catalog');
      adminServer = catalog.data && catalog.data.admin_servers[0];
    }
    return adminServer;
  }

  async function refresh() {
    if (!FS.key()) {
      refuse('Paste an admin key above (created with: fluxserve keys create NAME --admin).');
      return;
    }
    const name = await server();
    const [details, queue, failures, dead] = await Promise.all([
      FS.api(`/api/v1/enterprise/${name}/system_details`, {method: 'POST', body: {}}),
      FS.api('/api/fluxserve/admin/queue?limit=100'),
      FS.api('/api/fluxserve/admin/failures?limit=50'),
      FS.api('/api/fluxserve/webhooks/deliveries?status=dead&per_page=1'),
    ]);
    const refused = [details, queue, failures, dead].find((answer) => answer.status === 401 || answer.status === 403);
    if (refused) {
      refuse(`${refused.status}: ${(refused.data && refused.data.message) || 'refused'}. This view needs an admin key.`);
      return;
    }
    refuse('');
    if (details.ok) renderDetails(details.data);
    if (queue.ok) renderQueue(queue.data);
    if (failures.ok) renderFailures(failures.data.failures);
    $('dead-letters').textContent = dead.ok ? dead.data.total : '–';
    $('updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  function renderDetails(d) {
    const status = $('service-status');
    status.replaceChildren(el('span', {class: `pill ${d.status}`}, d.status));
    kv($('dependencies'), Object.fromEntries(Object.entries(d.dependencies || {}).map(([k, v]) => [k, v.reason || v])));
    $('queue-depth').textContent = d.queue_depth;
    $('running').textContent = d.running;
    $('queue-time').textContent = seconds(d.queue_time);
    kv($('worker'), d.worker);
    const residency = d.residency || {};
    kv($('device'), Object.assign({device: d.device}, d.gpu_memory || {gpu_memory: 'none (no CUDA device)'},
      {budget_bytes: residency.budget_bytes, resident_bytes: residency.resident_bytes, offload: residency.offload}));
    const loaded = d.models_loaded || [];
    const held = residency.pipelines || {};
    $('models-loaded').replaceChildren(...(loaded.length ? loaded.map((m) => el('li', {title: m}, pipeline(m),
      typeof held[m] === 'number' ? el('span', {class: 'muted'}, ` · ${size(held[m])}`) : null))
      : [el('li', {class: 'muted'}, 'none loaded')]));
    $('evictions').textContent = residency.evictions === undefined ? '' : `evictions to host memory: ${residency.evictions}`;
    $('details-raw').textContent = JSON.stringify(d, null, 2);
  }

  function renderQueue(q) {
    $('queue').replaceChildren(...(q.jobs.length ? q.jobs.map((job) => {
      const cancel = job.status === 'queued' ? el('button', {type: 'button', class: 'danger', dataset: {cancel: job.id}}, 'Cancel') : null;
      if (cancel) cancel.addEventListener('click', () => cancelJob(job.id));
      return el('tr', {dataset: {id: job.id}},
        el('td', {}, job.id), el('td', {}, el('span', {class: `pill ${job.status}`}, job.status)), el('td', {}, job.model),
        el('td', {}, job.task), el('td', {}, `${job.key_name || ''} (#${job.key_id})`), el('td', {}, seconds(job.waited_seconds)),
        el('td', {}, job.total ? `${job.step}/${job.total}` : ''), el('td', {}, cancel));
    }) : [el('tr', {}, el('td', {colspan: 8, class: 'muted'}, 'The queue is empty.'))]));
  }

  function renderFailures(rows) {
    $('failures').replaceChildren(...(rows.length ? rows.map((f) => el('tr', {dataset: {id: f.id}},
      el('td', {}, FS.when(f.time)), el('td', {}, f.id), el('td', {}, f.model),
      el('td', {}, `${f.key_name || ''} (#${f.key_id})`), el('td', {class: 'message'}, f.message)))
      : [el('tr', {}, el('td', {colspan: 5, class: 'muted'}, 'No failed jobs.'))]));
  }

  async function cancelJob(id) {
    const answer = await FS.api(`/api/fluxserve/admin/jobs/${id}/cancel`, {method: 'POST', body: {}});
    $('cancel-result').textContent = answer.ok ? `Request ${id} cancelled.` : `${answer.status}: ${(answer.data && answer.data.message) || 'refused'}`;
    refresh();
  }

  $('cancel-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const id = $('cancel-id').value.trim();
    if (id) cancelJob(id);
  });

  $('clear-queue').addEventListener('click', async () => {
    if (!window.confirm('Cancel every queued request? Running ones finish.')) return;
    const name = await server();
    const answer = await FS.api(`/api/v1/enterprise/${name}/clear_queue`, {method: 'POST', body: {}});
    $('cancel-result').textContent = answer.ok ? answer.data.detail : `${answer.status}: ${(answer.data && answer.data.message) || 'refused'}`;
    refresh();
  });

  function schedule() {
    clearInterval(timer);
    if ($('auto').checked) timer = setInterval(refresh, 3000);
  }
  $('auto').addEventListener('change', schedule);
  $('refresh').addEventListener('click', refresh);
  FS.setupKeyForm(refresh);
  refresh();
  schedule();
})();
